"""docs/guide.md shows what its commands print today (docs/gen_guide.py wrote it by running them).

The quick commands run again here on the real model and must print exactly the guide's text; the
slow one whose output is a table of its record (``eval``) is re-rendered from the record the guide's
run kept (docs/guide/eval.json) with today's code, so a change in what eval prints fails here too.
``search`` and ``heal`` (20 and 1-7 minutes) are left to ``python docs/gen_guide.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from layerprune.reporting.eval_tables import report_markdown

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_guide", ROOT / "docs" / "gen_guide.py")
gen_guide = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_guide)
BLOCKS = {match["command"]: match["output"] for match in gen_guide.commands(gen_guide.GUIDE.read_text())}


def _block(prefix: str) -> tuple[str, str]:
    return next((command, output) for command, output in BLOCKS.items() if command.startswith(prefix))


def test_the_eval_table_is_what_eval_prints_of_its_record_today() -> None:
    _, output = _block("layerprune eval ")
    report = json.loads((gen_guide.RECORDS / "eval.json").read_text())
    assert output == report_markdown(report) + "wrote out/eval.json, out/eval.md, out/eval.png\n"


@pytest.mark.real
@pytest.mark.parametrize("prefix", ["layerprune info --model smollm2-135m", "layerprune score ",
                                    "layerprune prune "])
def test_the_quick_commands_print_the_guides_text(prefix: str, smollm2_dir, tmp_path: Path) -> None:
    command, output = _block(prefix)
    assert gen_guide.run(command, tmp_path) == output
