"""Efficiency figures: FLOPs against an analytic count, the KV cache against the tensors a real
prefill caches, sizes, and the shape of the report.

Speeds are measured in benchmarks/ and never asserted here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.evaluation import efficiency
from layerprune.evaluation.efficiency import (
    Workload,
    flops_per_token,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    measure_efficiency,
)
from layerprune.models.architectures import adapter_for
from layerprune.models.loading import LoadedModel
from layerprune.models.tiny import TINY_FAMILIES, byte_tokenizer, tiny_config, tiny_model
from layerprune.reporting.eval_tables import comparison_table
from tests.helpers import tiny_loaded

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
    # keys and values of 2 KV heads x 8 dims in float32 per layer: 128 bytes a layer, a token
    assert (six["kv_cache_bytes_per_token"], three["kv_cache_bytes_per_token"]) == (6 * 128, 3 * 128)
    assert (six["kv_cache_ratio"], three["kv_cache_ratio"]) == (1.0, 0.5)
    assert six["kv_cache_context"] == WORKLOAD.prompt_len + WORKLOAD.new_tokens // 2
    table = comparison_table({"reference": "six", "models": {name: {"efficiency": values}
                                                                for name, values in results.items()}})
    assert "| KV cache per token (bytes) | 768 | 384 | -384 |" in table
    assert "| KV cache vs reference | 1 | 0.5 | -0.5 |" in table


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


def cached_bytes(model: nn.Module, context: int) -> int:
    """The bytes of every key and value tensor the model's own cache holds after prefilling ``context``
    tokens: the independent measurement :func:`kv_cache_bytes` is held to."""
    ids = torch.randint(0, 200, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    return sum(tensor.numel() * tensor.element_size() for layer in cache.layers
               for tensor in (layer.keys, layer.values) if tensor is not None)


def branch_pruned(family: str, *, layers: Sequence[int] = (), attention: Sequence[int] = (), mlp: Sequence[int] = (),
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    loaded = tiny_loaded(family, 6, dtype=dtype)
    lp.prune(loaded, list(layers), attention=list(attention), mlp=list(mlp))
    return loaded.model


KV_MODELS = {  # name -> a model (Gemma-3's tiny window is 4 tokens, Mistral's 8: the contexts pass both)
    **{family: lambda family=family: tiny_model(family, 6) for family in TINY_FAMILIES},
    "llama bfloat16": lambda: tiny_loaded("llama", 6, dtype=torch.bfloat16).model,
    "llama without 3 attentions": lambda: branch_pruned("llama", attention=[0, 2, 5], mlp=[1]),
    "llama without layers and attentions": lambda: branch_pruned("llama", layers=[3], attention=[1, 4]),
    "gemma3 without a sliding and the full attention": lambda: branch_pruned("gemma3", attention=[1, 2]),
    "gemma3 without layers": lambda: branch_pruned("gemma3", layers=[0, 2]),
    "mistral without 2 attentions": lambda: branch_pruned("mistral", attention=[0, 3]),
}


@pytest.mark.parametrize("name", sorted(KV_MODELS))
def test_the_kv_cache_count_equals_what_a_prefill_caches(name: str) -> None:
    model = KV_MODELS[name]()
    for context in (1, 3, 7, 40):  # within, at and past every tiny sliding window
        measured = cached_bytes(model, context)
        assert kv_cache_bytes(model, context) == measured, (name, context)
        assert kv_cache_bytes_per_token(model, context) == round(measured / context)


def test_removed_attentions_cache_nothing_and_a_sliding_window_caps_its_layers() -> None:
    """Llama: 128 bytes a layer (2 KV heads x 8 dims, keys and values, float32). Gemma-3 (2 sliding layers
    of window 4 per full one, the same 128 bytes): past the window each sliding layer holds 3 tokens."""
    assert kv_cache_bytes_per_token(tiny_model("llama", 6), 100) == 6 * 128
    assert kv_cache_bytes_per_token(branch_pruned("llama", attention=[0, 2, 5]), 100) == 3 * 128
    assert kv_cache_bytes_per_token(branch_pruned("llama", mlp=[0, 2, 5]), 100) == 6 * 128
    gemma = tiny_model("gemma3", 6)
    assert kv_cache_bytes(gemma, 2) == 6 * 128 * 2 and kv_cache_bytes(gemma, 100) == (2 * 100 + 4 * 3) * 128
    assert kv_cache_bytes_per_token(gemma, 100) == round((200 + 12) * 128 / 100)
    with pytest.raises(lp.UsageError, match="at least 1 token"):
        kv_cache_bytes_per_token(gemma, 0)


def long_context_llama(attention: Sequence[int] = (), mlp: Sequence[int] = ()) -> nn.Module:
    """The tiny 4-layer llama with a position table of 4096 tokens (the tiny one's 256 refuses a
    2048-token prompt), without the attention of the layers ``attention`` and the MLP of ``mlp``."""
    config = tiny_config("llama", 4)
    config.max_position_embeddings = 4096
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    loaded = LoadedModel(model, byte_tokenizer(), "tiny-llama-4096", adapter_for(model))
    if attention or mlp:
        lp.prune(loaded, attention=attention, mlp=mlp)
    return loaded.model


def closed_form_decode_flops(config, context: int, attentions: int, mlps: int) -> int:
    """One decode step's FLOPs over ``context`` cached tokens, from the config alone: 2 per weight of the
    q, k, v, o projections (k and v over the KV heads), the scores and the weighted sum over the
    ``context + 1`` keys (2 x 2 x heads x head size each), the three MLP projections, the LM head."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head = hidden // heads
    attention = 2 * hidden * (2 * heads * head + 2 * kv_heads * head) + 4 * heads * head * (context + 1)
    mlp = 3 * 2 * hidden * config.intermediate_size
    return attentions * attention + mlps * mlp + 2 * hidden * config.vocab_size


def test_removed_attentions_pay_off_with_context_removed_mlps_do_not() -> None:
    """The FLOP-ideal decode speed-up of removing half the attentions grows from a 256- to a 2048-token
    prompt (the attention over the cache grows with it); that of removing half the MLPs shrinks. Each
    count equals the closed form exactly (the counter sees only matmuls, all of which the closed form
    lists: tolerance 0), and the measured speed-ups and KV caches come out at both lengths (the timed
    figures are not asserted: timing is noise here)."""
    models = {"original": long_context_llama(), "half the attentions": long_context_llama(attention=[0, 2]),
              "half the MLPs": long_context_llama(mlp=[1, 3])}
    kept = {"original": (4, 4), "half the attentions": (2, 4), "half the MLPs": (4, 2)}  # attentions, MLPs
    config = models["original"].config
    ideal: dict[int, dict[str, float]] = {}
    for prompt_len in (256, 2048):
        workload = Workload(prompt_len=prompt_len, new_tokens=2, repeats=1, warmup=0)
        context = prompt_len + 1  # the middle of a 2-token decode
        closed = {name: closed_form_decode_flops(config, context, *branches) for name, branches in kept.items()}
        results = measure_efficiency(models, workload, disk=False, memory=False)
        for name, values in results.items():
            assert values["decode_flops_per_token"] == closed[name], (prompt_len, name)
            assert values["decode_ideal_speedup"] == pytest.approx(closed["original"] / closed[name], rel=1e-12)
            assert math.isfinite(values["decode_speedup"]) and values["decode_speedup"] > 0
        assert results["half the attentions"]["kv_cache_ratio"] == 0.5
        assert results["half the MLPs"]["kv_cache_ratio"] == 1.0
        ideal[prompt_len] = {name: values["decode_ideal_speedup"] for name, values in results.items()}
    # closed form: 1.54x -> 1.89x without half the attentions, 1.12x -> 1.02x without half the MLPs
    assert ideal[2048]["half the attentions"] > 1.15 * ideal[256]["half the attentions"] > 1.15
    assert ideal[2048]["half the MLPs"] < ideal[256]["half the MLPs"]
