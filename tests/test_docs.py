"""The generated API reference is current; the README's commands are ones the real parser accepts, and its\ntwo newcomer commands come first, the second being the steps CI runs."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from layerprune.cli.main import build_parser
from tests.helpers import script_module

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_current() -> None:
    module = script_module(ROOT / "docs" / "gen_api.py", "gen_api")
    assert (ROOT / "docs" / "api.md").read_text() == module.render(), "run: python docs/gen_api.py"


README = (ROOT / "README.md").read_text()


def bash_blocks(markdown: str) -> list[str]:
    """The text of every ```bash block in ``markdown``, in order."""
    return re.findall(r"^```bash\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)


def shell_commands(script: str) -> list[list[str]]:
    """Every command of a shell ``script`` as an argv list: comments dropped, chains (``a && b``)
    split into their commands."""
    commands = []
    for line in script.splitlines():
        argv: list[str] = []
        for token in [*shlex.split(line, comments=True), "&&"]:
            if token == "&&":
                commands += [argv] if argv else []
                argv = []
            else:
                argv.append(token)
    return commands


def parse_layerprune(argv: list[str]) -> argparse.Namespace:
    """``argv`` (``layerprune ...``) read by the real parser; an unknown command or flag, a missing
    required one or a bad value fails the test with the command."""
    assert argv[0] == "layerprune", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the README's command does not parse: {shlex.join(argv)}")


def test_every_readme_command_is_one_the_cli_accepts_and_every_command_is_shown() -> None:
    commands = [argv for block in bash_blocks(README) for argv in shell_commands(block) if argv[0] == "layerprune"]
    (subcommands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    assert {parse_layerprune(argv).command for argv in commands} == set(subcommands.choices)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_same_steps() -> None:
    """Under the title: one line that installs, prunes and generates, one that installs and tests,
    with the steps (and the pinned torch) CI runs."""
    assert README.split("\n\n", 1)[1].startswith("```bash\n")
    try_it, test_it = [commands for line in bash_blocks(README)[0].splitlines() if (commands := shell_commands(line))]
    args = parse_layerprune(try_it[-1])
    assert (args.command, args.model, args.generate is not None) == ("prune", "smollm2-135m", True)
    ci_steps = [[token for token in argv if token != "--quiet"]
                for argv in shell_commands((ROOT / ".ci" / "run").read_text())]
    assert all(step in ci_steps for step in [*test_it, try_it[0]]), (test_it, try_it, ci_steps)
