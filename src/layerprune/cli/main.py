"""The ``layerprune`` command line: one subcommand per pipeline step.

Each subcommand lives in its own module under :mod:`layerprune.cli.commands` and is discovered
here, so adding a command touches one file. A :class:`~layerprune.errors.UsageError` ends the run
with one line on stderr and exit code 2; no traceback is shown for input the user can fix.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from layerprune.errors import UsageError

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints a single line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"layerprune {self.prog.partition(' ')[2]}: error: {message} (see --help)\n".replace("  ", " "))
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from layerprune.cli import commands

    parser = OneLineParser(prog="layerprune", description="Depth pruning for Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not sys.stderr.isatty():
        # In a log file, progress bars are noise that buries the one-line error a failed run ends with.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        # messages quote user input (recipe keys, paths) that may hold line breaks: keep the one line
        sys.stderr.write(f"layerprune {args.command}: error: {' '.join(str(error).splitlines())}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"layerprune {args.command}: interrupted; outputs were left as they were\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
