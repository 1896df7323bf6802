"""Every metric against a straightforward reference implementation, on tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layerprune.errors import NumericalError, UsageError
from layerprune.models.surgery import remove_layers
from layerprune.scoring import METRICS, SimilarityAccumulator, score
from tests.conftest import FAMILIES
from tests.helpers import tiny_loaded
from tests.scoring.references import (
    all_layer_states, exact_dtype, masked_nll_sum, per_pair_means, rows_with_padding, tolerance,
)


def test_every_issue_metric_is_registered() -> None:
    assert set(METRICS.names()) >= {"bi", "angular", "block-cosine", "reverse-order", "random", "magnitude-l1",
                                    "magnitude-l2", "taylor", "ppl"}


@pytest.mark.parametrize("family", FAMILIES)
def test_bi_angular_block_cosine_equal_the_per_pair_reference(family: str) -> None:
    loaded = tiny_loaded(family, dtype=exact_dtype(family))
    calibration = rows_with_padding()
    report = score(loaded, calibration, ["bi", "angular", "block-cosine"], batch_size=2)
    rtol = tolerance(family)
    ins, outs = all_layer_states(loaded, calibration)
    real = calibration.attention_mask.bool()
    cosine, angle = per_pair_means(ins, outs, real)
    layers = loaded.num_layers
    expected_bi = [1.0 - cosine[(i, i)] for i in range(layers)]
    torch.testing.assert_close(torch.tensor(report.results["bi"].importance), torch.tensor(expected_bi),
                               rtol=rtol, atol=rtol)
    for n in range(1, layers + 1):
        starts = range(layers - n + 1)
        torch.testing.assert_close(torch.tensor(report.results["angular"].values[n]),
                                   torch.tensor([angle[(i, i + n - 1)] for i in starts]), rtol=rtol, atol=rtol)
        torch.testing.assert_close(torch.tensor(report.results["block-cosine"].values[n]),
                                   torch.tensor([cosine[(i, i + n - 1)] for i in starts]), rtol=rtol, atol=rtol)


def test_last_layer_is_scored_against_its_own_output_not_the_final_norm() -> None:
    loaded = tiny_loaded("llama", dtype=torch.float64)
    calibration = rows_with_padding()
    bi = score(loaded, calibration, ["bi"]).results["bi"].importance
    with torch.no_grad():
        states = loaded.model(calibration.input_ids, attention_mask=calibration.attention_mask,
                              output_hidden_states=True).hidden_states
    real = calibration.attention_mask.bool()
    naive_last = 1 - torch.nn.functional.cosine_similarity(states[-2], states[-1], dim=-1)[real].mean()
    assert abs(bi[-1] - float(naive_last)) > 1e-3, "the popular code's reading must differ, or this test has no teeth"


def test_last_positions_use_only_each_rows_last_real_token() -> None:
    loaded = tiny_loaded("llama", dtype=torch.float64)
    calibration = rows_with_padding()
    report = score(loaded, calibration, ["angular"], positions="last")
    ins, outs = all_layer_states(loaded, calibration)
    lengths = calibration.attention_mask.sum(dim=1)
    last = torch.zeros_like(calibration.attention_mask, dtype=torch.bool)
    last[torch.arange(len(lengths)), lengths - 1] = True
    _, angle = per_pair_means(ins, outs, last)
    for n, row in report.results["angular"].values.items():
        torch.testing.assert_close(torch.tensor(row), torch.tensor([angle[(i, i + n - 1)] for i in range(len(row))]))
    assert report.results["angular"].values != score(loaded, calibration, ["angular"]).results["angular"].values


def test_padding_tokens_never_count() -> None:
    loaded = tiny_loaded("qwen2", dtype=torch.float64)
    calibration = rows_with_padding()
    bi = score(loaded, calibration, ["bi", "ppl"])
    garbage = copy.copy(calibration)
    garbage.input_ids = calibration.input_ids.masked_fill(calibration.attention_mask == 0, 7)
    again = score(loaded, garbage, ["bi", "ppl"])
    assert bi.results["bi"].importance == pytest.approx(again.results["bi"].importance, rel=1e-12)
    assert bi.results["ppl"].importance == pytest.approx(again.results["ppl"].importance, rel=1e-12)
    assert bi.tokens == int(calibration.attention_mask.sum())
    # the same rows with every token declared real must score differently: the mask does matter
    unmasked = copy.copy(calibration)
    unmasked.attention_mask = torch.ones_like(calibration.attention_mask)
    assert score(loaded, unmasked, ["bi"]).results["bi"].importance != pytest.approx(bi.results["bi"].importance)


@pytest.mark.parametrize("family", FAMILIES)
def test_ppl_with_prefix_reuse_equals_removing_each_layer(family: str) -> None:
    loaded = tiny_loaded(family, dtype=exact_dtype(family))
    calibration = rows_with_padding()
    result = score(loaded, calibration, ["ppl"], batch_size=2).results["ppl"]
    targets = int((calibration.attention_mask[:, :-1] * calibration.attention_mask[:, 1:]).sum())
    expected = []
    for layer in range(loaded.num_layers):
        pruned = copy.deepcopy(loaded.model)
        remove_layers(pruned, [layer])
        expected.append(math.exp(masked_nll_sum(pruned, calibration) / targets))
    full = math.exp(masked_nll_sum(loaded.model, calibration) / targets)
    assert result.values == pytest.approx(expected, rel=tolerance(family))
    assert result.details["full_model"] == pytest.approx(full, rel=tolerance(family))
    assert max(abs(p - full) for p in expected) > 1e-3 * full, "removing a layer must change the perplexity"


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_equals_the_full_batch_gradient_reference(family: str) -> None:
    loaded = tiny_loaded(family, dtype=exact_dtype(family))
    calibration = rows_with_padding()
    importance = score(loaded, calibration, ["taylor"], batch_size=2).results["taylor"].importance
    reference = copy.deepcopy(loaded.model)
    targets = int((calibration.attention_mask[:, :-1] * calibration.attention_mask[:, 1:]).sum())
    (masked_nll_sum(reference, calibration, grad=True) / targets).backward()
    expected = [abs(float(sum((p.detach() * p.grad).sum() for p in layer.parameters())))
                for layer in loaded.adapter.decoder_layers(reference)]
    assert importance == pytest.approx(expected, rel=tolerance(family))
    assert all(p.grad is None for p in loaded.model.parameters()), "scoring must not leave gradients behind"
    assert all(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize(("metric", "order"), [("magnitude-l1", 1), ("magnitude-l2", 2)])
def test_magnitude_is_the_sum_of_weight_norms_per_layer(metric: str, order: int) -> None:
    loaded = tiny_loaded("llama")
    importance = score(loaded, None, [metric]).results[metric].importance
    prefix = loaded.adapter.layers
    expected = [0.0] * loaded.num_layers
    for name, parameter in loaded.model.named_parameters():
        if name.startswith(prefix + "."):
            layer = int(name[len(prefix) + 1:].split(".")[0])
            expected[layer] += float(parameter.detach().double().abs().pow(order).sum() ** (1 / order))
    assert importance == pytest.approx(expected, rel=1e-12)


def test_reverse_order_ranks_the_top_layer_lowest_and_random_follows_the_seed() -> None:
    loaded = tiny_loaded("llama")
    assert score(loaded, None, ["reverse-order"]).results["reverse-order"].importance == [6, 5, 4, 3, 2, 1]
    first = score(loaded, None, ["random"], seed=3).results["random"].importance
    assert first == score(loaded, None, ["random"], seed=3).results["random"].importance
    assert first != score(loaded, None, ["random"], seed=4).results["random"].importance


def test_scores_are_deterministic() -> None:
    loaded = tiny_loaded("gemma3")
    calibration = rows_with_padding()
    metrics = ["bi", "angular", "ppl", "taylor"]
    first, second = (score(loaded, calibration, metrics).to_json()["metrics"] for _ in range(2))
    assert first == second


def test_half_precision_models_are_scored_with_float32_accumulation() -> None:
    calibration = rows_with_padding()
    exact = score(tiny_loaded("llama"), calibration, ["bi"]).results["bi"].importance
    half = score(tiny_loaded("llama", dtype=torch.bfloat16), calibration, ["bi"]).results["bi"].importance
    assert half == pytest.approx(exact, abs=0.02)


def test_nan_activations_name_the_layer() -> None:
    loaded = tiny_loaded("llama")
    with torch.no_grad():
        loaded.adapter.decoder_layers(loaded.model)[3].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(NumericalError, match=r"layer 3 .*float32"):
        score(loaded, rows_with_padding(), ["bi"])


def test_bad_requests_fail_before_any_work() -> None:
    loaded = tiny_loaded("llama")
    with pytest.raises(UsageError, match="unknown metric 'bogus'"):
        score(loaded, rows_with_padding(), ["bi", "bogus"])
    with pytest.raises(UsageError, match="need calibration data"):
        score(loaded, None, ["magnitude-l1", "ppl"])
    with pytest.raises(UsageError, match="positions"):
        score(loaded, rows_with_padding(), ["bi"], positions="first")


def test_accumulator_merges_to_the_same_sums_as_one_stream() -> None:
    generator = torch.Generator().manual_seed(0)
    x_in, x_out = torch.randn(2, 3, 10, 8, generator=generator)
    mask = torch.rand(3, 10, generator=generator) > 0.3
    whole, left, right = SimilarityAccumulator(2), SimilarityAccumulator(2), SimilarityAccumulator(2)
    for accumulator, rows in ((whole, slice(0, 3)), (left, slice(0, 1)), (right, slice(1, 3))):
        accumulator.add(0, 0, x_in[rows], x_in[rows] + 0.5, mask[rows])
        accumulator.add(0, 1, x_in[rows], x_out[rows], mask[rows])
        accumulator.add(1, 1, x_out[rows], x_in[rows], mask[rows])
    merged = SimilarityAccumulator.from_state_dict(left.state_dict()).merge(right)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value)
    expected = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)[mask].double().mean()
    assert merged.mean_cosine()[2][0] == pytest.approx(float(expected), rel=1e-6)
