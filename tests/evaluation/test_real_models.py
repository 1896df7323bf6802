"""The evaluation path on the real SmolLM2-135M with the real offline data (kept small)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import layerprune as lp
from layerprune import data

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> lp.LoadedModel:
    return lp.load_model(smollm2_dir)


def reference_perplexity(loaded: lp.LoadedModel, seq_len: int, windows: int) -> float:
    """exp of the mean cross-entropy of every next token in the first ``windows`` non-overlapping
    windows of wiki-sample's test stream, straight from the model's logits (SmolLM2 puts no
    special token before a text, so a window is ``seq_len`` text tokens)."""
    assert data.text_prefix(loaded.tokenizer) == []
    stream = data.token_stream(loaded.tokenizer, "wiki-sample", split="test")
    nll, count = 0.0, 0
    for start in range(0, windows * seq_len, seq_len):
        window = stream[start:start + seq_len]
        with torch.no_grad():
            logits = loaded.model(window[None]).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


def test_perplexity_and_offline_lm_eval_task_on_smollm2(smollm2) -> None:
    pruned = copy.deepcopy(smollm2)
    lp.prune(pruned, range(20, 28))
    report = lp.evaluate(smollm2, compare=[pruned], ppl=["wiki-sample"], seq_len=128, max_windows=2,
                         tasks=["lp_sentiment_rt"], limit=16, batch_size=8)
    original, cut = report["models"].values()
    assert original["perplexity"]["wiki-sample"]["tokens"] == cut["perplexity"]["wiki-sample"]["tokens"] == 2 * 127
    for model, result in ((smollm2, original), (pruned, cut)):
        assert result["perplexity"]["wiki-sample"]["ppl"] == pytest.approx(reference_perplexity(model, 128, 2),
                                                                           rel=1e-4)
    assert cut["perplexity"]["wiki-sample"]["ppl"] > original["perplexity"]["wiki-sample"]["ppl"]  # 8 layers fewer
    assert len(original["predictions"]["lp_sentiment_rt"]) == 16
    assert 0.0 <= cut["stability"]["lp_sentiment_rt"] <= 1.0
    assert original["tasks"]["lp_sentiment_rt"]["acc"] > 0.5  # sentiment is easy for the original
