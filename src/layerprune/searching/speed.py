"""What a cut buys in decode speed: measured against the original in the same process, and the
FLOP-ideal figure beside it (:mod:`layerprune.evaluation.efficiency`); and, for a target speed-up,
the fewest layers whose removal reaches a measured decode speed-up.

Speed depends on how many layers run, not on which, so a search times one cut per depth (every
candidate of that depth shares its figures). Its workload is short (a 64-token prompt, 16 decoded
tokens, timed in turns, at least 3, until the interval is tight): enough to order cuts of different depth,
where the full ``layerprune eval --efficiency`` workload would cost more than the search itself.
A speed-up whose interval stays wide (a loaded machine) is reported as not measured, and the
FLOP-ideal figure stands in for it, with the reason.

A target speed-up is met in two steps: the layer count is found on whole-layer stand-ins
(:func:`layers_for_speedup`); a sub-layer candidate removes as many layers' parameters, but which
branches go decides its speed, so its own speed-up is timed before it is ranked, and a cut that
falls short is set aside with the figure it reached (:func:`sublayer_cuts_reaching`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import PreTrainedModel

from layerprune.evaluation.efficiency import TimedSpeedup, Workload, decode_speedup_in_turns, flop_ideal_speedup
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import remove_layers
from layerprune.searching.candidates import Candidate, cut
from layerprune.searching.config import SearchConfig

SEARCH_WORKLOAD = Workload(prompt_len=64, new_tokens=16, repeats=3, warmup=1)
Shape = tuple[int, int, int]
"""A cut's whole layers, lone attentions and lone MLPs (:attr:`Candidate.shape`): what its speed depends on."""


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


def flop_ideal_only(original: PreTrainedModel, cut: PreTrainedModel, workload: Workload, why: str) -> TimedSpeedup:
    """The FLOP-ideal speed-up of ``cut``, not timed (``why`` says so, as an untight timing's note does)."""
    return TimedSpeedup(None, None, 0, flop_ideal_speedup(original, cut, workload), note=why)


def sublayer_cuts_reaching(loaded: LoadedModel, plain: list[Candidate], target: float,
                           workload: Workload = SEARCH_WORKLOAD,
                           allows: Callable[[float], bool] = lambda seconds: True) -> tuple[
        list[Candidate], list[tuple[Candidate, TimedSpeedup, str]], dict[Shape, TimedSpeedup]]:
    """For a target decode speed-up of ``target``: the plain (unrepaired) candidates to rank, the sub-layer
    ones whose own speed-up falls short (each with it and why, not ranked), and the speed-ups timed, by
    shape, for the ranking to reuse.

    A whole-layer candidate removes the layers :func:`layers_for_speedup` found to reach the target and
    passes as it is. A sub-layer candidate removes as many layers' parameters, but in decode an attention
    costs more per parameter than an MLP, and more the longer the context, so each shape is timed like a
    whole-layer cut (in turns against the original, on ``workload``, in this process) and kept only where
    its speed-up reaches ``target``: measured, or FLOP-ideal where timing was not tight. Each timing is
    first asked of ``allows`` (the time budget) with the longest one so far as its estimate; once refused,
    the shapes left are judged by their FLOP-ideal figure, and the reason says so.
    """
    speeds: dict[Shape, TimedSpeedup] = {}
    reaching: list[Candidate] = []
    short: list[tuple[Candidate, TimedSpeedup, str]] = []
    longest, timed_out = 0.0, False
    for candidate in plain:
        if candidate.granularity != "sublayer":
            reaching.append(candidate)
            continue
        if candidate.shape not in speeds:  # a plain cut reads no calibration data
            working = cut(loaded, candidate, None, 1).model
            if timed_out or not allows(longest):
                timed_out = True
                speeds[candidate.shape] = flop_ideal_only(loaded.model, working, workload,
                                                          "not timed: the time budget left no room")
            else:
                began = time.perf_counter()
                speeds[candidate.shape] = decode_speedup(loaded.model, working, workload)
                longest = max(longest, time.perf_counter() - began)
        speed = speeds[candidate.shape]
        if speed.usable >= target:
            reaching.append(candidate)
        else:
            kind = ("measured" if speed.measured is not None else
                    f"FLOP-ideal: {speed.note}" if speed.turns == 0 else "FLOP-ideal: timing was not tight")
            short.append((candidate, speed, f"reaches only {speed.usable:.2f}x of the asked {target:g}x ({kind})"))
    return reaching, short, speeds
