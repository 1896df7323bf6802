"""The evaluation benchmark on a tiny checkpoint: both scorers answer the suite's own requests
alike, and the speed-up and table report the medians measured."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from tests.helpers import save_tiny_checkpoint

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eval.py"


def test_both_scorers_take_turns_on_the_suite_requests_and_agree(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("bench_eval_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    result = bench.compare(str(save_tiny_checkpoint(tmp_path / "tiny", num_layers=2)), limit=3, rounds=2, batch_size=4)
    assert result["requests"] == 3 * (4 + 2 + 8) + 3  # next sentence 4 choices, sentiment 2, topic 8, cloze 1
    assert result["max_loglik_difference"] < 1e-4 and result["greedy_flags_differing"] == 0
    assert result["speedup"] == result["seconds"]["lm-eval HFLM"] / result["seconds"]["scored positions"]
    assert f"**{result['speedup']:.2f}×**" in bench.table([result])
