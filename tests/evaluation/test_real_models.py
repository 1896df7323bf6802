"""The evaluation path on the real SmolLM2-135M with the real offline data (kept small)."""

from __future__ import annotations

import copy

import pytest

import layerprune as lp

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> lp.LoadedModel:
    return lp.load_model(smollm2_dir)


def test_perplexity_and_offline_lm_eval_task_on_smollm2(smollm2) -> None:
    pruned = copy.deepcopy(smollm2)
    lp.prune(pruned, range(20, 28))
    report = lp.evaluate(smollm2, compare=[pruned], ppl=["wiki-sample"], seq_len=128, max_windows=2,
                         tasks=["lp_sentiment_rt"], limit=16, batch_size=8)
    original, cut = report["models"].values()
    assert original["perplexity"]["wiki-sample"]["tokens"] == cut["perplexity"]["wiki-sample"]["tokens"] == 2 * 127
    # a 135M instruct model on clean Wikipedia text: PPL well below 100; dropping 8 layers hurts
    assert 5 < original["perplexity"]["wiki-sample"]["ppl"] < 100
    assert cut["perplexity"]["wiki-sample"]["ppl"] > original["perplexity"]["wiki-sample"]["ppl"]
    assert len(original["predictions"]["lp_sentiment_rt"]) == 16
    assert 0.0 <= cut["stability"]["lp_sentiment_rt"] <= 1.0
    assert original["tasks"]["lp_sentiment_rt"]["acc"] > 0.5  # sentiment is easy for the original
