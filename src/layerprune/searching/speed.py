"""What a cut buys in decode speed: measured against the original in the same process, and the
FLOP-ideal figure beside it (:mod:`layerprune.evaluation.efficiency`); and, for a target speed-up,
the fewest layers whose removal reaches a measured decode speed-up.

Speed depends on how many layers run, not on which, so a search times one cut per depth (every
candidate of that depth shares its figures). Its workload is short (a 64-token prompt, 16 decoded
tokens, timed in turns, at least 3, until the interval is tight): enough to order cuts of different depth,
where the full ``layerprune eval --efficiency`` workload would cost more than the search itself.
A speed-up whose interval stays wide (a loaded machine) is reported as not measured, and the
FLOP-ideal figure stands in for it, with the reason.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from layerprune.evaluation.efficiency import TimedSpeedup, Workload, decode_speedup_in_turns
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import remove_layers
from layerprune.searching.config import SearchConfig

SEARCH_WORKLOAD = Workload(prompt_len=64, new_tokens=16, repeats=3, warmup=1)


def decode_speedup(original: PreTrainedModel, cut: PreTrainedModel, workload: Workload = SEARCH_WORKLOAD) -> TimedSpeedup:
    """Time ``cut`` against ``original`` in turns until the speed-up's interval is tight (speed is
    only meaningful as a same-run ratio); where it stays wide, the FLOP-ideal figure stands in."""
    return decode_speedup_in_turns(original, cut, workload)


def top_cut(loaded: LoadedModel, count: int) -> LoadedModel:
    """A weight-sharing copy without ``count`` layers below the last one: a stand-in of any cut of
    that depth for timing (speed depends on how many layers run, not on which)."""
    working = loaded.copy(share_weights=True)
    last = loaded.num_layers - 1
    remove_layers(working.model, list(range(last - count, last)), working.adapter)
    return working


def layers_for_speedup(loaded: LoadedModel, target: float, workload: Workload = SEARCH_WORKLOAD) -> tuple[int, float]:
    """The fewest layers to remove for a decode speed-up of ``target``, and the speed-up there (measured;
    FLOP-ideal where timing could not pin it down); refused when even keeping one layer does not reach it.

    Bisection over the count, the deepest cut timed first (it decides whether any count will do).
    """
    deepest = loaded.num_layers - 1
    reached = decode_speedup(loaded.model, top_cut(loaded, deepest).model, workload)
    if reached.usable < target:
        kind = "measured" if reached.measured is not None else "FLOP-ideal (timing was not tight)"
        SearchConfig.refuse("target_speedup", f"{target:g} is out of reach: removing {deepest} of "
                                              f"{loaded.num_layers} layers gives a {kind} decode speed-up of only "
                                              f"{reached.usable:.2f}x; ask for less")
    low, high, at_high = 1, deepest, reached.usable  # invariant: removing `high` layers reaches the target
    while low < high:
        middle = (low + high) // 2
        speedup = decode_speedup(loaded.model, top_cut(loaded, middle).model, workload).usable
        if speedup >= target:
            high, at_high = middle, speedup
        else:
            low = middle + 1
    return high, at_high
