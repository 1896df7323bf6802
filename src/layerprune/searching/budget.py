"""A search's time budget, kept over the whole run: scoring, selections, ranking.

Each costly step is asked for before it starts, with an estimate of what it costs (the metrics
declare their cost in forward passes of the calibration data, :meth:`Metric.forward_passes`; the
seconds of one pass are measured on the cheap metrics, which run first), so a loaded machine gets
fewer metrics and candidates, not a longer run. What the budget left out is recorded with the
reason (``search.json``'s ``budget_spent``), and a search that ranked fewer candidates than it
meant to says so in its report, its figure and its exit line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

clock: Callable[[], float] = time.perf_counter
"""The clock the budget reads (a test replaces it with one that a slowed step advances)."""


@dataclass
class TimeBudget:
    """``minutes`` of wall-clock time from now (``None``: no limit), and what it left out."""

    minutes: float | None
    began: float = field(default_factory=lambda: clock())
    left_out: dict[str, str] = field(default_factory=dict)
    """What the budget skipped (a metric, a selection, candidates) -> why, in words."""
    kept: float = 0.0
    """Seconds set aside for a later stage (see :meth:`keeping`): a step now must leave them."""
    kept_for: str = ""
    """The later stage the kept seconds are for, in words (said when a step is skipped)."""

    @property
    def seconds_left(self) -> float:
        return math.inf if self.minutes is None else self.began + self.minutes * 60 - clock()

    @property
    def elapsed(self) -> float:
        return clock() - self.began

    def allows(self, estimated_seconds: float) -> bool:
        """Whether a step expected to take ``estimated_seconds`` still ends inside the budget, leaving
        what is :attr:`kept` for later."""
        return estimated_seconds <= self.seconds_left - self.kept

    @contextmanager
    def keeping(self, seconds: float, stage: str) -> Iterator[None]:
        """Inside, every step must leave ``seconds`` of the budget to ``stage``, which comes after: the
        ranking of the candidates, or an evolution's generations, while the metrics that propose them are
        scored (on a CPU one costly metric can otherwise spend the whole budget)."""
        self.kept, self.kept_for = seconds, stage
        try:
            yield
        finally:
            self.kept, self.kept_for = 0.0, ""

    def skip(self, what: str, estimated_seconds: float, log: Callable[[str], None]) -> None:
        """Record (and say, in one line) that ``what`` was left out for the budget."""
        kept = f" ({self.kept:.0f} s of them kept for {self.kept_for})" if self.kept else ""
        reason = (f"the time budget ({self.minutes:g} min) had {max(self.seconds_left, 0):.0f} s left{kept} and "
                  f"this takes about {estimated_seconds:.0f} s")
        self.left_out[what] = reason
        log(f"search: {what} skipped: {reason}")
