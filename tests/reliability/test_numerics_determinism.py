"""Numerics: float16 overflow is caught while scoring and named. Determinism: the same seed gives
the same scores, selection and healed weights on the same machine."""

from __future__ import annotations

import pytest
import torch

import layerprune as lp
from layerprune.errors import NumericalError
from layerprune.healing import TrainingSet
from layerprune.models.loading import LoadedModel
from layerprune.scoring import score
from layerprune.selection import select
from tests.helpers import tiny_loaded

OVERFLOWING_LAYER = 2


def calibration_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(seed))


def overflowing(dtype: torch.dtype) -> LoadedModel:
    """Layer 2's MLP scaled so that its output exceeds float16's range (65504) but not float32's."""
    loaded = tiny_loaded(dtype=dtype)
    with torch.no_grad():
        mlp = loaded.adapter.decoder_layers(loaded.model)[OVERFLOWING_LAYER].mlp
        mlp.up_proj.weight.mul_(20_000)
        mlp.down_proj.weight.mul_(20_000)
    assert torch.isfinite(torch.cat([p.flatten() for p in loaded.model.parameters()])).all(), "weights stay finite"
    return loaded


def test_float16_overflow_is_reported_with_the_layer_and_a_dtype() -> None:
    with pytest.raises(NumericalError, match=rf"layer {OVERFLOWING_LAYER} .*float16.*--dtype float32"):
        score(overflowing(torch.float16), calibration_ids(), ["bi"])


def test_the_same_model_in_float32_scores_finite() -> None:
    """The overflow above is float16's doing: the suggested dtype gives real scores."""
    importance = score(overflowing(torch.float32), calibration_ids(), ["bi"]).results["bi"].importance
    assert all(torch.isfinite(torch.tensor(importance)))


def test_same_seed_same_scores_and_selection() -> None:
    def run(seed: int) -> tuple[dict, list[int], list[int]]:
        report = score(tiny_loaded(), calibration_ids(), ["bi", "taylor", "random"], seed=seed)
        chosen = select(report, 2, metric="taylor").remove
        by_random = select(report, "50%", metric="random").remove
        return report.to_json()["metrics"], chosen, by_random

    first, again, other = run(7), run(7), run(8)
    assert first == again
    for seed, result in ((7, first), (8, other)):  # the seed reaches the metric: each run draws its own numbers
        expected = torch.rand(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
        assert result[0]["random"] == expected
        assert result[2] == sorted(torch.tensor(expected).argsort()[:3].tolist())
    assert first[0]["random"] != other[0]["random"]


def test_same_seed_same_healed_weights() -> None:
    rows = TrainingSet.from_ids(torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0)))

    def healed(seed: int) -> dict[str, torch.Tensor]:
        loaded = tiny_loaded()
        lp.prune(loaded, [2, 3])
        result = lp.heal(loaded, "partial-ft", rows, steps=3, batch_size=4, seed=seed, train_layers=2)
        return {name: tensor.clone() for name, tensor in result.model.state_dict().items()}

    first, again, other = healed(0), healed(0), healed(1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first), "the seed is actually used"
