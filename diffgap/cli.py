"""The one ``diffgap`` command. Each subcommand lives in its own module exposing

    HELP: str
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int

Those modules import torch/onnx/tensorrt lazily inside ``run`` so that ``diffgap --help`` and the
torch-free subcommands (``search``, ``serve`` ...) start fast and run on a lean runtime install.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from diffgap.core.errors import UserError

log = logging.getLogger("diffgap")

# What the CLI reports as a one-line user error (exit 2). OS errors about paths the user named
# (missing input, existing output, no permission) are user mistakes too; ValueError/KeyError are not:
# raised from library code they mean a bug, and hiding their traceback hides the bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
)

# name -> module; order is the order --help lists them, following the data flow.
COMMANDS: dict[str, str] = {
    "synth": "diffgap.commands.synth",
    "embed": "diffgap.commands.embed",
    "train": "diffgap.commands.train",
    "eval": "diffgap.commands.eval",
    "generate": "diffgap.commands.generate",
    "export": "diffgap.export.cli",
    "build-engines": "diffgap.runtime.cli_build_engines",
    "index": "diffgap.runtime.cli_index",
    "search": "diffgap.runtime.cli_search",
    "triton-repo": "diffgap.triton_models.cli_repo",
    "serve": "diffgap.triton_models.cli_serve",
}


def _available() -> dict[str, object]:
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            # Only tolerate the command module itself being absent (a lean install without an
            # extra); a missing dependency *inside* a present module is a real error.
            if e.name != modname:
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    from diffgap import __version__

    p = argparse.ArgumentParser(prog="diffgap", description="DiffGAP: bridge the modality gap inside CLAP/CAVP embedding spaces.")
    p.add_argument("--version", action="version", version=f"diffgap {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in _available().items():
        sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # laion-clap/transformers hang for minutes otherwise
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as e:
        # A mistake the user can fix: one line naming it (the message says the fix), exit 2. With -v
        # the traceback is shown as well. Any other exception is a bug and propagates with its
        # traceback (Python exits 1).
        if args.verbose:
            log.debug("traceback of the error below", exc_info=e)
        print(f"diffgap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffgap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
