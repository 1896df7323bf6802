"""What a cut buys in decode speed: measured against the original in the same process, and the
FLOP-ideal figure beside it (:mod:`layerprune.evaluation.efficiency`); and, for a target speed-up,
the fewest layers whose removal reaches a measured decode speed-up.

Speed depends on how many layers run, not on which, so a search times one cut per depth (every
candidate of that depth shares its figures). Its workload is short (a 64-token prompt, 16 decoded tokens, the
median of 3 interleaved repeats): enough to order cuts of different depth, where the full
``layerprune eval --efficiency`` workload would cost more than the search itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from layerprune.evaluation.efficiency import Workload, measure_efficiency
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import remove_layers
from layerprune.searching.config import SearchConfig

SEARCH_WORKLOAD = Workload(prompt_len=64, new_tokens=16, repeats=3, warmup=1)


@dataclass(frozen=True)
class Speedup:
    """Decode speed-up of a cut over the original: measured (tokens/s ratio) and FLOP-ideal."""

    measured: float
    ideal: float


def decode_speedup(original: PreTrainedModel, cut: PreTrainedModel, workload: Workload = SEARCH_WORKLOAD) -> Speedup:
    """Time ``cut`` interleaved with ``original`` (speed is only meaningful as a same-run ratio)."""
    figures = measure_efficiency({"original": original, "cut": cut}, workload, disk=False, memory=False)["cut"]
    return Speedup(figures["decode_speedup"], figures["decode_ideal_speedup"])


def top_cut(loaded: LoadedModel, count: int) -> LoadedModel:
    """A weight-sharing copy without ``count`` layers below the last one: a stand-in of any cut of
    that depth for timing (speed depends on how many layers run, not on which)."""
    working = loaded.copy(share_weights=True)
    last = loaded.num_layers - 1
    remove_layers(working.model, list(range(last - count, last)), working.adapter)
    return working


def layers_for_speedup(loaded: LoadedModel, target: float, workload: Workload = SEARCH_WORKLOAD) -> tuple[int, float]:
    """The fewest layers to remove for a measured decode speed-up of ``target``, and the speed-up
    measured there; refused when even keeping one layer does not reach it.

    Bisection over the count, the deepest cut timed first (it decides whether any count will do).
    """
    deepest = loaded.num_layers - 1
    reached = decode_speedup(loaded.model, top_cut(loaded, deepest).model, workload).measured
    if reached < target:
        SearchConfig.refuse("target_speedup", f"{target:g} is out of reach: removing {deepest} of "
                                              f"{loaded.num_layers} layers gives a measured decode speed-up of only "
                                              f"{reached:.2f}x; ask for less")
    low, high, at_high = 1, deepest, reached  # invariant: removing `high` layers reaches the target
    while low < high:
        middle = (low + high) // 2
        measured = decode_speedup(loaded.model, top_cut(loaded, middle).model, workload).measured
        if measured >= target:
            high, at_high = middle, measured
        else:
            low = middle + 1
    return high, at_high
