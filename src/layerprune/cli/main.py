"""The ``layerprune`` command line: one subcommand per pipeline step.

Each subcommand lives in its own module under :mod:`layerprune.cli.commands` and is discovered
here, so adding a command touches one file. A :class:`~layerprune.errors.UsageError` ends the run
with one line on stderr and exit code 2; no traceback is shown for input the user can fix.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import pkgutil
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from layerprune import __version__
from layerprune.cli import commands
from layerprune.cli.spec import DefaultsShownFormatter, quick_parser
from layerprune.errors import OptionError, UsageError, worded
from layerprune.outputs import write_failure
from layerprune.progress import set_quiet

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# errors only a write (or a path check of an output) can raise: whatever raised them, they concern an output
WRITE_ONLY_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG})


class OneLineParser(argparse.ArgumentParser):
    """argparse, with the conventions of every ``layerprune`` command (see :mod:`layerprune.cli.options`).

    A bad flag prints a single line naming the command (the usage is one ``--help`` away); a flag is
    never silently completed from a prefix (``--layer`` is not ``--layers``, ``--metric`` is not
    ``--metrics``); every default shows in ``--help``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsShownFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse, but unknown flags are reported by the subcommand they were given to (argparse
        reports them from the top-level parser, as ``layerprune : error:``)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._command_parsers().get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def _command_parsers(self) -> dict[str, argparse.ArgumentParser]:
        return {name: parser for action in self._actions if isinstance(action, argparse._SubParsersAction)
                for name, parser in action.choices.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="layerprune", description="Depth pruning for Hugging Face causal LMs.",
                           epilog="Outputs: --out FOLDER where a command fills a folder (prune, heal, run), "
                                  "--output FILE where it writes one results file with its .md/.png beside it "
                                  "(score, eval).")
    parser.add_argument("--version", action="version", version=f"layerprune {__version__}")
    add_verbosity_flags(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    for command in subparsers.choices.values():  # also after the subcommand, where users put them
        add_verbosity_flags(command, default=argparse.SUPPRESS)
    return parser


def add_verbosity_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``-v``/``-q``: on the top-level parser with ``default``; on a subcommand with no default
    (``SUPPRESS``), so one given before the subcommand is not reset by its absence after it."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also log what each step does (details beside the progress)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress bars or lines and no warnings: errors and the results only")


def _build_parser_holding_ctrl_c() -> argparse.ArgumentParser:
    """:func:`build_parser`, with a Ctrl-C during it held until it returns.

    Building the parser imports torch and transformers (seconds). A KeyboardInterrupt raised inside
    a compiled extension's initialisation is not catchable: the process aborts with a C++ message.
    So the signal is only noted while the imports run and raised as KeyboardInterrupt afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        return build_parser()  # signals reach only the main thread; nothing to hold here
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        parser = build_parser()
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    # the process's own command line: help, the version and a flag argparse refuses end here, before torch
    # loads; a caller in Python (argv given) may have registered units since, which only the real parser knows
    quick = quick_parser(OneLineParser) if argv is None else None
    if quick is not None:
        quick.parse_args(arguments)
    try:
        parser = _build_parser_holding_ctrl_c()
    except KeyboardInterrupt:
        sys.stderr.write("layerprune: interrupted while starting; nothing was written\n")
        return EXIT_INTERRUPTED
    args = parser.parse_args(arguments)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet ask for opposite things; give one")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
                        format="%(message)s")
    set_quiet(args.quiet)
    try:
        if not sys.stderr.isatty():
            # In a log file, progress bars are noise that buries the one-line error a failed run ends with.
            # deferred: at module top, transformers (seconds) would load outside the parser's Ctrl-C guard
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        return int(args.run(args) or 0)
    except UsageError as error:  # an option is named by its flag here, by its keyword in Python, by its key in a recipe
        return _refuse(args.command, _in_flags(parser, args.command, error))
    except OSError as error:
        if error.errno not in WRITE_ONLY_ERRNOS:
            raise  # a read error or a bug: its traceback says where
        return _refuse(args.command, write_failure(error))
    except KeyboardInterrupt:
        sys.stderr.write(f"layerprune {args.command}: interrupted; outputs were left as they were\n")
        return EXIT_INTERRUPTED


def _in_flags(parser: argparse.ArgumentParser, command: str, error: UsageError) -> str:
    """``error``'s message with every option it names called by its flag where ``command`` has one;
    otherwise (an option a recipe's stage set, under ``layerprune run``) by its name, as a recipe writes it."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags = {flag for action in commands.choices[command]._actions for flag in action.option_strings}

    def label(name: str, flag: str | None = None) -> str:
        flag = flag or "--" + name.replace("_", "-")
        return flag if flag in flags else name

    text = error.render(label(error.name, error.flag)) if isinstance(error, OptionError) else Exception.__str__(error)
    return worded(text, label)


def _refuse(command: str, error: Exception | str) -> int:
    # messages quote user input (recipe keys, paths) that may hold line breaks: keep the one line
    sys.stderr.write(f"layerprune {command}: error: {' '.join(str(error).splitlines())}\n")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
