"""Efficiency figures: FLOPs against an analytic count, sizes, and the shape of the report.

Speeds are measured in benchmarks/ and never asserted here."""

from __future__ import annotations

import pytest
from torch import nn

from layerprune.evaluation import efficiency
from layerprune.evaluation.efficiency import Workload, flops_per_token, measure_efficiency
from layerprune.models.tiny import tiny_model

WORKLOAD = Workload(prompt_len=12, new_tokens=8, repeats=1, warmup=0)


def _analytic_decode_flops(model: nn.Module, context: int) -> int:
    """2 FLOPs per weight of every linear layer (LM head included), plus per layer the two
    attention matmuls over ``context`` cached tokens plus the new one: 2 x 2 x heads x head_dim x (context+1)."""
    config = model.config
    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    head_dim = config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * 4 * config.num_attention_heads * head_dim * (context + 1)
    return linear + attention


@pytest.mark.parametrize("layers", [2, 5])
def test_decode_flops_match_the_analytic_count(layers: int) -> None:
    model = tiny_model("llama", layers)
    _, decode = flops_per_token(model, WORKLOAD)
    assert decode == _analytic_decode_flops(model, WORKLOAD.prompt_len + WORKLOAD.new_tokens // 2)


# seconds per (prefill, decode) of the timed pass, by layer count: stands in for the clock, so the
# speed-ups have known values (six layers: 12 / 0.4 and 8 / 0.8 tokens/s; three: 12 / 0.25 and 8 / 0.5)
FAKE_SECONDS = {6: (0.4, 0.8), 3: (0.25, 0.5)}


def test_report_has_every_figure_and_speedups_relative_to_the_first_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(efficiency, "time_prefill_decode",
                        lambda model, workload: FAKE_SECONDS[model.config.num_hidden_layers])
    models = {"six": tiny_model("llama", 6), "three": tiny_model("llama", 3)}
    results = measure_efficiency(models, WORKLOAD, memory=False)
    six, three = results["six"], results["three"]
    assert six["decode_speedup"] == six["prefill_ideal_speedup"] == 1.0
    assert (six["prefill_tokens_per_s"], six["decode_tokens_per_s"]) == pytest.approx((30.0, 10.0))
    assert (three["prefill_speedup"], three["decode_speedup"]) == pytest.approx((1.6, 1.6))
    analytic = {name: _analytic_decode_flops(model, WORKLOAD.prompt_len + WORKLOAD.new_tokens // 2)
                for name, model in models.items()}
    assert three["decode_ideal_speedup"] == pytest.approx(analytic["six"] / analytic["three"])
    assert three["parameters"] < six["parameters"]
    # float32 safetensors: 4 bytes per parameter plus a small header
    for values in results.values():
        assert values["parameters"] * 4 <= values["disk_bytes"] < values["parameters"] * 4 + 20_000
    assert three["decode_ideal_speedup"] == pytest.approx(six["decode_flops_per_token"] / three["decode_flops_per_token"])
    assert 1.0 < three["decode_ideal_speedup"] < 2.0  # the LM head and embeddings do not shrink
    assert three["decode_tokens_per_s"] > 0 and three["prefill_tokens_per_s"] > 0


def test_speed_only_measurement_saves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_saving(*_: object, **__: object) -> None:
        raise AssertionError("a speed-only measurement saved a model")

    monkeypatch.setattr(efficiency, "size_on_disk", refuse_saving)
    results = measure_efficiency({"six": tiny_model("llama", 6), "three": tiny_model("llama", 3)}, WORKLOAD,
                                 disk=False, memory=False)
    assert "disk_bytes" not in results["three"] and "peak_memory_bytes" not in results["three"]
    assert results["three"]["decode_speedup"] > 0



def _timed_in_turns(monkeypatch: pytest.MonkeyPatch, decode_seconds) -> tuple[efficiency.TimedSpeedup, list[int]]:
    """Time a 6-layer model against a 3-layer one in turns, the decode seconds of the ``n``-th timing
    of a model with ``layers`` layers being ``decode_seconds(layers, n)``; returns the speed-up and
    the layer count of each model timed, in order."""
    order: list[int] = []

    def fake(model: nn.Module, workload: Workload) -> tuple[float, float]:
        layers = model.config.num_hidden_layers
        order.append(layers)
        return 0.1, decode_seconds(layers, order.count(layers))

    monkeypatch.setattr(efficiency, "time_prefill_decode", fake)
    return efficiency.decode_speedup_in_turns(tiny_model("llama", 6), tiny_model("llama", 3), WORKLOAD), order


def test_a_steady_speedup_is_measured_in_three_turns_taking_sides_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    speed, order = _timed_in_turns(monkeypatch, lambda layers, n: layers * (1 + 0.001 * n))
    assert speed.measured == pytest.approx(2.0, rel=1e-3) and speed.turns == 3 and speed.note is None
    assert speed.interval[0] <= speed.measured <= speed.interval[1]
    assert order == [6, 3, 3, 6, 6, 3]  # the reference first, then the candidate first, ...
    assert speed.usable == speed.measured


def test_a_speedup_too_noisy_to_pin_down_is_not_reported_as_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load a ratio swings 1x-4x from turn to turn: after the most turns the FLOP-ideal figure stands."""
    swings = [1.0, 4.0, 1.5, 3.5, 1.2, 3.0]
    speed, order = _timed_in_turns(monkeypatch, lambda layers, n: 1.0 if layers == 3 else swings[n % len(swings)])
    assert speed.measured is None and speed.turns == 12 and len(order) == 24
    assert speed.usable == speed.ideal and 1.0 < speed.ideal < 2.0
    assert speed.note.startswith("not measured: the 95% interval stayed ") and "FLOP-ideal" in speed.note


@pytest.mark.parametrize("values", [[1.0, 2.0], [0.1, 0.5, 0.2, 0.9], [3.0 + 0.1 * i for i in range(40)]])
def test_the_mean_interval_is_students_t(values: list[float]) -> None:
    from scipy import stats

    from layerprune.evaluation.intervals import mean_interval

    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values), scale=stats.sem(values))
    tolerance = 0.04 if len(values) > 31 else 1e-3  # past 30 degrees of freedom the normal quantile stands in
    assert mean_interval(values) == pytest.approx([low, high], rel=tolerance)
