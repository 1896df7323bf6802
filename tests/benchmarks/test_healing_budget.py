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


def test_methods_and_data_choose_the_points_run(bench, monkeypatch, tmp_path) -> None:
    (tmp_path / "unhealed.json").write_text('{"removed": [], "kl": 1.0, "top1_agreement": 0.5, "ppl": 10.0}')
    monkeypatch.setattr(bench, "results_dir", lambda: tmp_path)
    monkeypatch.setattr(bench.lp, "load_model", lambda name, device: object())
    monkeypatch.setattr(bench, "cut", lambda original: [])
    run: list[tuple] = []
    monkeypatch.setattr(bench, "run_point", lambda original, removed, method, source, tokens, device:
                        run.append((method, source, tokens)) or {})
    bench.main(["--budgets", "655360", "--methods", "lora", "--data", "wiki,self-generated", "--no-doc"])
    assert run == [("lora", "wiki", 655360), ("lora", "self-generated", 655360)]


@pytest.mark.parametrize("flag, value", [("--methods", "qlora"), ("--data", "wiki,c4"), ("--data", ","), ("--data", "wiki,")])
def test_an_unknown_method_or_data_exits_2_naming_the_choices(bench, capsys, flag, value) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--budgets", "", flag, value])
    assert exit_.value.code == 2
    assert "choose from" in capsys.readouterr().err
