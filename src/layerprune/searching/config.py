"""What a search is asked for: the one declaration of its options (:class:`SearchConfig`).

:func:`layerprune.search` takes it, a recipe's ``search`` section is read as it, ``layerprune
search`` makes its flags from it and ``search.json`` records it, so a default is written once and
every front-end refuses the same values with the same words. The calibration the search scores on
is the :class:`~layerprune.data.CalibrationConfig` every data-driven stage reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from layerprune.errors import UsageError
from layerprune.options import SEED_RANGE, Config, Parse, option
from layerprune.searching.fitness import FITNESSES
from layerprune.searching.ranking import DropRule
from layerprune.selection import check_remove

DEFAULT_REMOVE = "25%"
ALGORITHMS = ("heuristic", "evolution")
GRANULARITIES = ("layer", "sublayer", "both")
"""What a search's candidates remove: whole layers, attention and MLP branches, or both side by side."""


class SearchConfig(Config):
    """The budget (layers or a decode speed-up, time, candidates), how candidates are ranked on
    held-out text, and what becomes of the winner."""

    unit = "search"

    remove: Annotated[int | str | None, Parse(str)] = option(
        None, f"layers to remove: a count (8) or a share (25%); {DEFAULT_REMOVE} unless a target speed-up is given")
    target_speedup: float | None = option(
        None, "instead of a layer count: the fewest layers whose removal gives this measured decode speed-up over "
        "the original (more than 1); a sub-layer candidate removes as many layers' parameters and is ranked only "
        "if its own decode speed-up, timed the same way (FLOP-ideal where timing is not tight), reaches it",
        metavar="X")
    time_budget: float | None = option(
        None, "minutes for the whole search, scoring included: costly metrics and further candidates only while "
        "their estimated cost fits, and the costly metrics only while they leave half of it to ranking (an "
        "evolution: to its generations), or after the ranking if it left them time; what is left out is said and "
        "recorded; healing the winner is not counted",
        metavar="MINUTES")
    granularity: str = option(
        "layer", "layer: candidates remove whole layers; sublayer: attention and MLP branches (remove then counts "
        "decoder parameters: a share of them, or N layers' worth); both: each metric's branch selection beside its "
        "layer selection, at the parameters of the N whole layers (evolution: over branches, seeded with both)",
        choices=GRANULARITIES)
    max_candidates: int | None = option(None, "rank at most this many candidates, cheapest first", minimum=1,
                                        metavar="N")
    rank_data: str | Path | None = option(
        None, "held-out text to rank on (default: another split of the calibration data; needed when that is a "
        "local file, which has no split)")
    rank_windows: int = option(16, "held-out windows of the calibration's seq_len tokens", minimum=1)
    drop_factor: float = option(DropRule.factor, "drop a candidate whose running perplexity exceeds this times the "
                                "best so far (0: never drop)", minimum=0)
    drop_after: int = option(DropRule.after, "windows a candidate is scored on before it can be dropped", minimum=0)
    repairs: bool = option(True, "rank every cut also with each training-free repair that applies (off: plain cuts "
                           "only)", flag="--repair")
    exhaustive: bool = option(False, "also the iterative selections of the costly metrics (ppl: SLEB; taylor), which "
                              "re-score the model after every removal: each costs about as many of that metric's "
                              "scorings as layers are removed")
    batch_size: int = option(8, "rows per forward pass", minimum=1)
    heal: str | None = option(None, "heal the winner only with this method (e.g. lora), on the calibration data",
                              metavar="METHOD")
    algorithm: str = option("evolution", "evolution: evolve the removed set from every metric x strategy cut and "
                            "random ones by its fitness on calibration rows, then rank the best few (the default: at "
                            "20 minutes its winner was as good as heuristic's on SmolLM2 and far better on Gemma-3, "
                            "docs/benchmarks.md); heuristic: rank every metric x strategy cut, no generations (its work "
                            "is fixed, where an evolution without --time-budget runs all its generations)",
                            choices=ALGORITHMS)
    fitness: str = option("kl", "evolution's fitness on calibration rows: kl (mean KL divergence of the cut's "
                          "next-token distribution from the original's) or ppl (the cut's log-perplexity)",
                          choices=FITNESSES)
    generations: int = option(100, "evolution: at most this many generations (the time budget may end it first)",
                              minimum=1)
    offspring: int = option(8, "evolution: children per generation, each swapping 1 to 3 removed layers for kept "
                            "ones", minimum=1)
    fitness_rows: int = option(32, "evolution: calibration rows the fitness reads (the original's hidden states at "
                               "every layer boundary are kept in memory for them)", minimum=1)
    finalists: int = option(3, "evolution: the best cuts by fitness ranked on held-out text, each also with every "
                            "training-free repair that applies", minimum=1)
    seed: int = option(0, "evolution: the seed of its random cuts and mutations (same seed, same winner; on the "
                       "command line the one --seed, which also draws the calibration windows)",
                       minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])

    def check(self) -> None:
        """The budget's rules: one of a layer count or a speed-up, each bound that excludes itself,
        and a layer count that reads (whether it leaves a layer waits for the model)."""
        if self.remove is not None and self.target_speedup is not None:
            raise UsageError("give either remove (a layer count) or target_speedup (a measured decode speed-up), "
                             "not both")
        if self.target_speedup is not None and not self.target_speedup > 1:
            self.refuse("target_speedup", f"must be more than 1 (a speed-up over the original), got "
                                          f"{self.target_speedup}")
        if self.time_budget is not None and not self.time_budget > 0:
            self.refuse("time_budget", f"must be more than 0 minutes, got {self.time_budget}; leave it out for no "
                                       "limit")
        if self.removal is not None:
            check_remove(self.removal)

    @property
    def removal(self) -> int | str | None:
        """The layers to remove (a count or a share): ``remove``, or 25% when neither it nor a target
        speed-up is given; ``None`` when the target speed-up decides the count."""
        if self.target_speedup is not None:
            return None
        return DEFAULT_REMOVE if self.remove is None else self.remove

    @property
    def drop_rule(self) -> DropRule:
        return DropRule(after=self.drop_after, factor=self.drop_factor)
