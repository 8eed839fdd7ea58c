"""Subcommand modules of the ``diffgap`` CLI (see diffgap/cli.py)."""
