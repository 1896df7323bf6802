"""What pruning buys: parameters, size on disk, prefill/decode throughput, peak memory, FLOPs, KV cache.

Speed is only meaningful as a ratio measured in the same run on the same machine, so the models
are timed interleaved (original, pruned, original, ...), after a warm-up, several times, and the
median is kept. Beside each measured speed-up stands the ideal one from the FLOP count: FLOPs per
token of the reference over those of the candidate, counted by torch's ``FlopCounterMode`` over a
real forward pass, so the LM head, embeddings and attention over the cache are all included.

Peak memory on CPU is the peak resident set of a fresh process that loads the saved checkpoint
and runs the same prefill and decode (one process per model: a process's peak never goes down).
On CUDA it is ``torch.cuda.max_memory_allocated`` in this process.

The KV cache per token is counted from the config and the model's structure
(:func:`kv_cache_bytes_per_token`), not timed: it is exact, and it says what a sub-layer cut buys
that the parameters do not (a layer whose attention is removed caches nothing). It is read at a
stated context, since a layer a sliding window caps stops adding bytes once the window fills.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, PreTrainedModel

from layerprune.errors import UsageError
from layerprune.evaluation.intervals import mean_interval
from layerprune.models.sublayers import RemovedAttention, kv_bytes_per_layer
from layerprune.options import NO_FLAG, Config, option


class Workload(Config):
    """One measurement: prefill ``prompt_len`` tokens, then greedily decode ``new_tokens`` with a KV cache,
    for ``batch`` rows at once (tokens/s count every row: a GPU is only busy at a larger batch).
    The ``efficiency`` options of an evaluation, declared once for the API, a recipe and the flags."""

    unit = "efficiency"

    prompt_len: int = option(128, "prefill length in tokens", minimum=1)
    new_tokens: int = option(64, "greedy decode steps", minimum=1)
    repeats: int = option(5, "timed repeats, the median kept", minimum=1)
    warmup: int = option(1, "untimed rounds before the timed repeats", minimum=0, flag=NO_FLAG)
    batch: int = option(1, "rows prefilled and decoded at once", minimum=1, flag=NO_FLAG)


def _prompt(model: PreTrainedModel, length: int, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (batch, length), generator=generator).to(next(model.parameters()).device)


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache: ``cache`` since transformers 5.25 (the old
    ``past_key_values`` then warns on every decode step), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_prefill_decode(model: PreTrainedModel, workload: Workload) -> tuple[float, float]:
    """Seconds for the prefill and for the ``new_tokens`` greedy decode steps (KV cache on)."""
    device = next(model.parameters()).device
    ids = _prompt(model, workload.prompt_len, workload.batch)
    _sync(device)
    start = time.perf_counter()
    output = model(input_ids=ids, use_cache=True)
    token = output.logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    cache = output.past_key_values
    start = time.perf_counter()
    for _ in range(workload.new_tokens):
        output = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache})
        cache = output.past_key_values
        token = output.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - start


def decode_context(workload: Workload) -> int:
    """The tokens in the cache at the middle of ``workload``'s decode: where its per-token decode
    figures (FLOPs, KV cache) are read."""
    return workload.prompt_len + workload.new_tokens // 2


@torch.no_grad()
def flops_per_token(model: PreTrainedModel, workload: Workload) -> tuple[float, float]:
    """FLOPs per token of the prefill, and of one decode step at the middle of the decode.

    The math attention kernel is forced while counting: it runs as plain matmuls, which the
    counter sees, whereas the fused CPU kernel would be silently left out.
    """
    context = decode_context(workload)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            model(input_ids=_prompt(model, workload.prompt_len), use_cache=True)
        prefill = counter.get_total_flops() / workload.prompt_len
        cache = model(input_ids=_prompt(model, context), use_cache=True).past_key_values
        with FlopCounterMode(display=False) as counter:
            model(input_ids=_prompt(model, 1), use_cache=True, **{cache_keyword(model): cache})
        decode = counter.get_total_flops()
    return float(prefill), float(decode)


def attention_windows(config: Any) -> list[int | None]:
    """Per decoder layer, the sliding window of its attention (``None``: it attends to every token), read
    as transformers' cache reads the config: ``layer_types`` where the config lists them (Gemma-2/3,
    Qwen2/3), else every layer sliding when the config sets a ``sliding_window`` (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or (
        ["sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers)
    return [window if kind == "sliding_attention" else None for kind in kinds]


def kv_cache_bytes(model: PreTrainedModel, context: int) -> int:
    """Bytes of the KV cache one row holds after ``context`` tokens (prompt and decoded alike).

    Each layer that still has its attention caches keys and values of every KV head per token, in the
    model's dtype (:func:`~layerprune.models.sublayers.kv_bytes_per_layer`); a layer whose attention
    was removed caches nothing (its slot, named by the stand-in's ``layer_idx``, only counts tokens); a
    sliding-window layer of window ``W`` keeps the last ``W - 1`` tokens between steps, as transformers'
    cache does (the token being decoded is the window's last), so its share stops growing there.
    """
    config = model.config.get_text_config(decoder=True)
    per_layer = kv_bytes_per_layer(config, model.dtype)
    uncached = {module.layer_idx for module in model.modules() if isinstance(module, RemovedAttention)}
    return sum(per_layer * (context if window is None else min(context, window - 1))
               for index, window in enumerate(attention_windows(config)) if index not in uncached)


def kv_cache_bytes_per_token(model: PreTrainedModel, context: int) -> int:
    """The KV cache per token of ``model`` at a context of ``context`` tokens: :func:`kv_cache_bytes`
    over ``context``, rounded to the nearest byte (exact unless a sliding window caps a layer: a
    capped layer's share then falls as the context grows, which is why the context is asked for)."""
    if context < 1:
        raise UsageError(f"the context must be at least 1 token, got {context}")
    return round(kv_cache_bytes(model, context) / context)


def size_on_disk(model: PreTrainedModel, folder: Path) -> int:
    """Bytes of the safetensors checkpoint ``save_pretrained`` writes into ``folder``."""
    model.save_pretrained(folder)
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def peak_memory_bytes(model: PreTrainedModel, checkpoint: Path, workload: Workload) -> int:
    """Peak memory of one prefill+decode (see the module docstring for how it is measured)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        time_prefill_decode(model, workload)
        return int(torch.cuda.max_memory_allocated(device))
    command = [sys.executable, "-m", "layerprune.evaluation.efficiency", str(checkpoint),
               json.dumps({"prompt_len": workload.prompt_len, "new_tokens": workload.new_tokens,
                           "batch": workload.batch}),
               str(next(model.parameters()).dtype).removeprefix("torch.")]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory probe failed: {result.stderr.strip()[-2000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


def check_workload_fits(workload: Workload, context: int | None, model: str) -> None:
    """The prompt and the tokens decoded after it within ``model``'s context of ``context`` tokens: a
    model with learned positions (GPT-2, OPT) indexes past its position table otherwise."""
    if context is not None and workload.prompt_len + workload.new_tokens > context:
        workload.refuse("prompt_len", f"{workload.prompt_len} plus {workload.new_tokens} new tokens passes the "
                                      f"context of {model} ({context} tokens); use at most "
                                      f"{max(context - workload.new_tokens, 1)}")


def measure_efficiency(models: dict[str, PreTrainedModel], workload: Workload = Workload(), *,
                       disk: bool = True, memory: bool = True) -> dict[str, dict[str, Any]]:
    """Efficiency figures of each model, the first being the reference for the speed-ups.

    Returns per model: parameters, disk_bytes (with ``disk``), prefill/decode tokens/s (medians),
    FLOPs per token, the KV cache per token at the middle of the decode (:func:`decode_context`,
    also recorded) and its ratio to the first model's (``None`` when the first caches nothing),
    peak_memory_bytes (with ``memory``), and for the others measured and FLOP-ideal speed-ups. Both
    footprints save the model to a scratch folder, which for a speed-only caller (a study timing
    dozens of models) is seconds of writing per model for nothing.
    """
    if not models:
        raise UsageError("efficiency needs at least one model")
    for name, model in models.items():
        check_workload_fits(workload, getattr(model.config, "max_position_embeddings", None), name)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="layerprune-eff-") as scratch:
        for index, (name, model) in enumerate(models.items()):
            prefill_flops, decode_flops = flops_per_token(model, workload)
            results[name] = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "prefill_flops_per_token": prefill_flops,
                "decode_flops_per_token": decode_flops,
                "kv_cache_context": decode_context(workload),
                "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model, decode_context(workload)),
            }
            if disk or memory:
                folder = Path(scratch) / f"model-{index}"
                disk_bytes = size_on_disk(model, folder)
                if disk:
                    results[name]["disk_bytes"] = disk_bytes
                if memory:
                    results[name]["peak_memory_bytes"] = peak_memory_bytes(model, folder, workload)
    timings = {name: ([], []) for name in models}
    for round_index in range(workload.warmup + workload.repeats):
        for name, model in models.items():  # interleaved: drifts in machine load hit every model alike
            prefill, decode = time_prefill_decode(model, workload)
            if round_index >= workload.warmup:
                timings[name][0].append(prefill)
                timings[name][1].append(decode)
    for name, (prefills, decodes) in timings.items():
        results[name]["prefill_tokens_per_s"] = workload.batch * workload.prompt_len / statistics.median(prefills)
        results[name]["decode_tokens_per_s"] = workload.batch * workload.new_tokens / statistics.median(decodes)
    reference = results[next(iter(models))]
    for values in results.values():
        values["kv_cache_ratio"] = (values["kv_cache_bytes_per_token"] / reference["kv_cache_bytes_per_token"]
                                    if reference["kv_cache_bytes_per_token"] else None)
        for phase in ("prefill", "decode"):
            values[f"{phase}_speedup"] = values[f"{phase}_tokens_per_s"] / reference[f"{phase}_tokens_per_s"]
            values[f"{phase}_ideal_speedup"] = (reference[f"{phase}_flops_per_token"]
                                                / values[f"{phase}_flops_per_token"])
    return results


@dataclass(frozen=True)
class TimedSpeedup:
    """A decode speed-up timed in turns: the geometric mean of the per-turn ratios and its 95%
    interval; ``measured`` is ``None`` when the interval never came within the tolerance, and
    ``note`` then says why (the FLOP-ideal figure is the one to read)."""

    measured: float | None
    interval: tuple[float, float] | None
    turns: int
    ideal: float
    note: str | None = None

    @property
    def usable(self) -> float:
        """The measured speed-up where it is tight, else the FLOP-ideal one."""
        return self.ideal if self.measured is None else self.measured


def flop_ideal_speedup(reference: PreTrainedModel, candidate: PreTrainedModel, workload: Workload) -> float:
    """The decode speed-up ``candidate`` would have over ``reference`` if time followed FLOPs per token."""
    return flops_per_token(reference, workload)[1] / flops_per_token(candidate, workload)[1]


def decode_speedup_in_turns(reference: PreTrainedModel, candidate: PreTrainedModel, workload: Workload, *,
                            tolerance: float = 0.1, max_turns: int = 12) -> TimedSpeedup:
    """Time ``candidate``'s decode against ``reference``'s in turns (reference first in even turns,
    the candidate first in odd ones, so a drift in load hits both alike) until the 95% interval of
    the speed-up lies within ``tolerance`` of it, at least ``workload.repeats`` turns (and 3) and at
    most ``max_turns``.

    Each turn gives one ratio of decode times; their logs are averaged (a ratio's noise is
    multiplicative). On a loaded machine a median of a few timings can be off by 2x; a figure whose
    interval stays wide is not reported as measured.
    """
    ideal = flop_ideal_speedup(reference, candidate, workload)
    for _ in range(workload.warmup):
        for model in (reference, candidate):
            time_prefill_decode(model, workload)
    least = max(workload.repeats, 3)
    logs: list[float] = []
    while True:
        pair = (reference, candidate) if len(logs) % 2 == 0 else (candidate, reference)
        decode = {id(model): time_prefill_decode(model, workload)[1] for model in pair}
        logs.append(math.log(decode[id(reference)] / decode[id(candidate)]))
        if len(logs) < least:
            continue
        low, high = mean_interval(logs)
        interval = (math.exp(low), math.exp(high))
        tight = high - low <= 2 * math.log1p(tolerance)
        if tight or len(logs) >= max(max_turns, least):
            break
    centre = math.exp(sum(logs) / len(logs))
    if tight:
        return TimedSpeedup(centre, interval, len(logs), ideal)
    return TimedSpeedup(None, interval, len(logs), ideal,
                        note=f"not measured: the 95% interval stayed {interval[0]:.2f}x-{interval[1]:.2f}x after "
                             f"{len(logs)} turns (a loaded machine); the FLOP-ideal {ideal:.2f}x stands in")


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (Linux): ``VmRSS`` now, ``VmHWM`` the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _probe(checkpoint: str, workload_json: str, dtype: str) -> None:
    """Child process: load ``checkpoint``, run the workload once, print how far the peak resident
    set rose above the resident set after imports (what the model and its run cost).

    VmHWM, not ``ru_maxrss``: the latter survives ``exec`` and would report the parent's peak.
    """
    baseline = status_bytes("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    time_prefill_decode(model, Workload(**json.loads(workload_json)))
    print(json.dumps({"peak_bytes": status_bytes("VmHWM") - baseline}))


if __name__ == "__main__":
    _probe(*sys.argv[1:4])
