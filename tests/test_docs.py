"""The generated API reference is current, and the README keeps its two newcomer commands first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "api.md").read_text() == module.render(), "run: python docs/gen_api.py"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_same_tests() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in lines[:8] if line.startswith("pip install")]
    assert len(commands) == 2
    assert "layerprune prune --model smollm2-135m" in commands[0] and "--generate" in commands[0]
    test_command = commands[1].rsplit("&& ", 1)[-1]
    assert test_command in (ROOT / ".ci" / "run").read_text()
