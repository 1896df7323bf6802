"""benchmarks/healing_budget.py without running it: the table lists the unhealed cut and every point
in order, and the figure passes the figure checks (every series drawn, labelled, inside its axes)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import script_module
from tests.reporting.figure_checks import check_figure

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "healing_budget.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return script_module(SCRIPT, "healing_budget_under_test")


def _point(method: str, data: str, tokens: int, kl: float, ppl: float) -> dict:
    return {"method": method, "data": data, "tokens": tokens, "kl": kl, "top1_agreement": 0.5, "ppl": ppl,
            "heal_seconds": 12.5, "device": "cpu", "generated_tokens": tokens // 2 if data == "self-generated" else None}


def test_budgets_are_spaced_x4_from_10k_tokens(bench) -> None:
    assert bench.BUDGETS[0] == 10_240 and all(b == 4 * a for a, b in zip(bench.BUDGETS, bench.BUDGETS[1:]))
    assert all(tokens % (bench.SEQ_LEN * bench.BATCH) == 0 for tokens in bench.BUDGETS)  # whole steps


def test_table_and_figure(bench) -> None:
    baseline = {"removed": [11, 12, 13, 14, 15, 16, 17, 18], "kl": 1.5, "top1_agreement": 0.4, "ppl": 130.0}
    points = [_point("lora", "wiki", 40_960, 0.9, 100.0), _point("lora", "wiki", 10_240, 1.2, 110.0),
              _point("lora+distill", "self-generated", 10_240, 1.0, 120.0)]
    table = bench.render(points, baseline, "test machine")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith("| unhealed | – | 0 | 1.500 | 0.400 | 130.0 |")
    assert [row.split(" | ")[2] for row in rows[1:]] == ["10,240", "40,960", "10,240"]
    assert [row.split(" | ")[6] for row in rows[1:]] == ["10,240", "40,960", "5,120"]  # self-generated: its continuations
    assert "layers 11, 12, 13, 14, 15, 16, 17, 18 (bi, independent, 25%)" in table
    figure = bench.figure(points, baseline)
    check_figure(figure)
    kl_axis = figure.axes[0]
    assert kl_axis.get_xscale() == "log"
    assert sorted(len(line.get_xdata()) for line in kl_axis.lines if line.get_marker() == "o") == [1, 2]
