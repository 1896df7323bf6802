"""The evaluation benchmark on a tiny checkpoint: both scorers answer the suite's own requests
alike, take turns, and the speed-up and table report the ratio of the medians measured (on a
clock the test controls, so the expected figures are known before the benchmark runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.helpers import save_tiny_checkpoint, script_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eval.py"

# seconds each scorer's turns take, in order: medians 5 and 2, so the speed-up is 2.5, where the
# ratio of the means (2.43), of the first (2.25), the last or the fastest turns (3) would differ
TURNS = {"lm-eval HFLM": [9.0, 5.0, 3.0], "scored positions": [4.0, 2.0, 1.0]}


def test_both_scorers_take_turns_on_the_suite_requests_and_agree(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bench = script_module(BENCH, "bench_eval_under_test")
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    clock = SimpleNamespace(now=0.0)
    turns = {label: iter(seconds) for label, seconds in TURNS.items()}
    order: list[str] = []

    def on_the_clock(kind: type, label: str) -> type:
        """``kind`` whose every scoring turn advances the benchmark's clock by ``label``'s next turn."""
        class Timed(kind):
            def loglikelihood(self, *args: Any, **kwargs: Any) -> list[tuple[float, bool]]:
                answers = super().loglikelihood(*args, **kwargs)
                order.append(label)
                clock.now += next(turns[label])
                return answers
        return Timed

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(bench, "HFLM", on_the_clock(bench.HFLM, "lm-eval HFLM"))
    monkeypatch.setattr(bench, "ScoredPositionsLM", on_the_clock(bench.ScoredPositionsLM, "scored positions"))
    result = bench.compare(str(save_tiny_checkpoint(tmp_path / "tiny", num_layers=2)), limit=3, rounds=3, batch_size=4)
    assert result["requests"] == 3 * (4 + 2 + 8) + 3  # next sentence 4 choices, sentiment 2, topic 8, cloze 1
    assert result["max_loglik_difference"] < 1e-4 and result["greedy_flags_differing"] == 0
    assert order == ["lm-eval HFLM", "scored positions"] * 3  # turns alternate, so load hits both alike
    assert result["seconds"] == {"lm-eval HFLM": 5.0, "scored positions": 2.0}
    assert result["speedup"] == pytest.approx(2.5)
    assert "| 5.0 | 2.0 | **2.50×** |" in bench.table([result])
