"""Encoders that define the frozen embedding spaces: CLAP (laion-clap) and CAVP (Diff-Foley)."""
