"""The quick parser (the command line rebuilt from ``cli/commands.json``) answers as the real one.

It exists so ``--help``, ``--version`` and a flag argparse refuses cost no torch import; it must not
change a word of what the real parser (built from the stage configs) prints or accepts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from layerprune.cli.main import OneLineParser, build_parser
from layerprune.cli.spec import SPEC_FILE, quick_parser, spec_text

REAL = build_parser()
QUICK = quick_parser(OneLineParser)
COMMANDS = sorted(next(a for a in REAL._actions if isinstance(a, argparse._SubParsersAction)).choices)


def test_the_shipped_spec_is_current() -> None:
    assert SPEC_FILE.read_text() == spec_text(REAL), "run: python docs/gen_api.py"


def _outcome(parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple:
    try:
        parser.parse_args(argv)
        code = None
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=lambda c: " ".join(c) or "top")
def test_every_help_text_is_the_real_parsers(command: list[str], capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    real = _outcome(REAL, [*command, "--help"], capsys)
    assert real[0] == 0 and real[1].startswith("usage: layerprune")
    assert _outcome(QUICK, [*command, "--help"], capsys) == real


ARGVS = [
    ["--version"], [], ["prune"], ["prune", "--bogus"], ["prune", "--model", "m", "--out", "o", "--layer", "3"],
    ["score", "--model", "m", "--samples", "x"], ["score", "--model", "m", "--samples", "8", "--seq-len", "2.5"],
    ["heal", "--model", "m", "--out", "o", "--method", "nope"], ["heal", "--model", "m", "--out", "o", "--steps"],
    ["search", "--model", "m", "--out", "o", "--no-repair", "--time-budget", "x"],
    ["eval", "--model", "m", "--output", "r.json", "--dtype", "bogus"], ["run"], ["run", "r.yaml", "--out", "o"],
    ["prune", "--model", "m", "--out", "o", "--layers", "1,2", "--metric", "bi", "--remove", "2"],
    ["info", "--model", "m", "extra"], ["nonsense"], ["-v", "info", "--model", "m"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_the_quick_parser_refuses_what_the_real_one_refuses_in_its_words(argv: list[str], capsys) -> None:
    """Either both refuse with the same line, or the quick one lets it through (a value only the real
    parser's own type function checks, such as ``--dtype``) and the real one decides."""
    quick, real = _outcome(QUICK, argv, capsys), _outcome(REAL, argv, capsys)
    assert quick == real or (quick[0] is None and real[0] == 2)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["prune", "--help"], ["prune", "--bogus"],
                                  ["score", "--model", "m", "--samples", "x"]], ids=" ".join)
def test_help_version_and_bad_flags_do_not_import_torch(argv: list[str]) -> None:
    probe = ("import sys\nfrom layerprune.cli.main import main\ntry:\n    main()\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert done.stderr.splitlines()[-1] == "[]", done.stderr


def test_a_damaged_spec_leaves_the_answer_to_the_real_parser(tmp_path) -> None:
    damaged = tmp_path / "commands.json"
    damaged.write_text('{"prog": "layerprune", "actions": [')
    assert quick_parser(OneLineParser, damaged) is None and quick_parser(OneLineParser, tmp_path / "none") is None
