"""The real SmolLM2-135M scored end to end on ``wiki-sample`` (lean: 256 tokens, 32 for ``ppl``)."""

from __future__ import annotations

import math

import pytest
import torch

import layerprune as lp
from layerprune.data import build_calibration
from tests.scoring.references import all_layer_states, masked_nll_sum, per_pair_means

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> lp.LoadedModel:
    return lp.load_model(str(smollm2_dir))


def test_smollm2_scores_select_and_prune_on_wiki_sample(smollm2: lp.LoadedModel) -> None:
    calibration = build_calibration(smollm2.tokenizer, "wiki-sample", samples=4, seq_len=64, seed=0)
    report = lp.score(smollm2, calibration, ["bi", "angular", "block-cosine"], batch_size=4)
    selection = lp.select(report, "25%", "independent", "bi")
    document = report.to_json(selection)
    assert document["num_layers"] == 30 and document["tokens"] == 256
    assert len(document["metrics"]["bi"]) == 30 and len(document["metrics"]["angular"]["30"]) == 1
    assert document["selection"] == {"metric": "bi", "strategy": "independent", "remove": selection.remove}
    assert len(selection.remove) == 8  # 25% of 30, rounded to the nearest layer

    ins, outs = all_layer_states(smollm2, calibration)
    cosine, angle = per_pair_means(ins, outs, calibration.attention_mask.bool())
    assert report.results["bi"].importance == pytest.approx([1 - cosine[(i, i)] for i in range(30)], abs=1e-5)
    assert report.results["angular"].values[8] == pytest.approx([angle[(i, i + 7)] for i in range(23)], abs=1e-5)

    assert all(math.isfinite(v) for v in report.results["block-cosine"].values[1])
    assert torch.tensor(report.results["bi"].importance).argmax() in (0, 29), "first or last layer changes most"


def test_smollm2_ppl_predicts_the_pruned_models_perplexity(smollm2: lp.LoadedModel) -> None:
    calibration = build_calibration(smollm2.tokenizer, "wiki-sample", samples=1, seq_len=32, seed=1)
    ppl = lp.score(smollm2, calibration, ["ppl"]).results["ppl"]
    victim = min(range(30), key=ppl.importance.__getitem__)
    pruned = smollm2.copy(share_weights=True)
    lp.prune(pruned, [victim])
    targets = int(calibration.attention_mask[:, 1:].sum())
    assert ppl.values[victim] == pytest.approx(math.exp(masked_nll_sum(pruned.model, calibration) / targets), rel=1e-4)
    assert ppl.details["full_model"] < max(ppl.values)
