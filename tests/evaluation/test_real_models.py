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


def direct_fidelity(original: lp.LoadedModel, candidate: lp.LoadedModel, seq_len: int,
                    windows: int) -> tuple[float, float]:
    """Mean KL(original || candidate) in nats and the top-1 agreement over every predicted token of
    the first ``windows`` windows of wiki-sample's test stream, from the two models' logits in
    float64 (no layerprune code between the logits and the numbers)."""
    stream = data.token_stream(original.tokenizer, "wiki-sample", split="test")
    kl, agreed, count = 0.0, 0, 0
    for start in range(0, windows * seq_len, seq_len):
        window = stream[start:start + seq_len][None]
        with torch.no_grad():
            ours = torch.log_softmax(original.model(window).logits[0, :-1].double(), dim=-1)
            theirs = torch.log_softmax(candidate.model(window).logits[0, :-1].double(), dim=-1)
        kl += (ours.exp() * (ours - theirs)).sum().item()
        agreed += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        count += ours.shape[0]
    return kl / count, agreed / count


def test_fidelity_and_generation_on_smollm2(smollm2) -> None:
    """``eval --fidelity`` and ``--generation`` on the real model: a copy of the original is at KL 0,
    agrees on every top-1 token and says the same; BI's 25% cut is not, and its KL and agreement
    are the direct computation's on the same windows."""
    itself = smollm2.copy()
    calibration = lp.build_calibration(smollm2.tokenizer, "wiki-sample", samples=2, seq_len=128)
    removed = lp.select(lp.score(smollm2, calibration, ["bi"]), "25%", "independent", "bi").remove
    assert len(removed) == 8  # 25% of 30 layers (docs/RESULTS.md: 8 of 30)
    pruned = smollm2.copy()
    lp.prune(pruned, removed)
    seq_len, windows, prompts, tokens = 128, 2, 2, 10
    report = lp.evaluate(smollm2, compare=[itself, pruned], fidelity=["wiki-sample"], seq_len=seq_len,
                         max_windows=windows, generation=prompts, generation_tokens=tokens, batch_size=4)
    original_name, self_name, cut_name = report["models"]
    assert "fidelity" not in report["models"][original_name]  # the original is what the others are compared with
    same, cut = (report["models"][name] for name in (self_name, cut_name))

    same_fidelity = same["fidelity"]["wiki-sample"]
    assert same_fidelity["tokens"] == windows * (seq_len - 1)
    assert same_fidelity["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same_fidelity["top1_agreement"] == 1.0
    assert same["generation"]["identical"] == 1.0 and same["generation"]["prompts"] == prompts
    assert all(example["original"] == example["model"] for example in same["generation"]["examples"])

    cut_fidelity = cut["fidelity"]["wiki-sample"]
    kl, agreement = direct_fidelity(smollm2, pruned, seq_len, windows)
    assert cut_fidelity["kl"] == pytest.approx(kl, rel=1e-4)
    assert cut_fidelity["top1_agreement"] == pytest.approx(agreement, abs=1e-9)  # a count: exact
    assert cut_fidelity["kl"] > 0.1 and cut_fidelity["top1_agreement"] < 1.0
    low, high = cut_fidelity["kl_ci95"]
    assert 0 < low <= cut_fidelity["kl"] <= high
    low, high = cut_fidelity["top1_agreement_ci95"]
    assert low <= cut_fidelity["top1_agreement"] <= high < 1.0
    generation = cut["generation"]
    assert 0 <= generation["mean_agreed_tokens"] <= tokens and generation["identical"] < 1.0
