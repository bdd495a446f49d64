"""The `gitfast` console script: one subcommand per module, imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

# name -> (module, one-line help). Each module defines `configure(parser)` and `run(args) -> int`.
COMMANDS = {
    "caption": ("gitfast.captioning.cli", "caption images, folders, globs and tar shards"),
    "bench": ("gitfast.bench.runner", "benchmark gitfast's kernels and end-to-end captioning"),
    "info": ("gitfast.tools.info", "show versions, devices and which backend serves each op"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2 with the message on stderr (argparse's default too)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported and configured (None: every module), so a
    subcommand whose dependencies fail to import cannot break the others."""
    parser = _Parser(prog="gitfast", description="Fast GIT image-to-text inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is None or name == command:
            importlib.import_module(module).configure(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the subcommand is the first word that is not an option (the top level has only --help)
    chosen = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
