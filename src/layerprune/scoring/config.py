"""What a scoring runs: :class:`ScoreConfig`, the one declaration of the scoring stage's options.

:func:`layerprune.score` builds it from its keywords (whose defaults are its declarations), a
recipe's ``score`` section is read as its keys (beside the metrics' own options, which stay each
metric's ``options_class``), ``layerprune score`` makes ``--metrics`` and ``--batch-size`` from it,
and the scores' JSON records it; so a default is written once and a bad value is refused alike
everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import field_validator

from layerprune.options import Config, Parse, Registered, comma_list, option
from layerprune.scoring.base import METRICS


class ScoreConfig(Config):
    """Which metrics score the layers, and how many calibration rows go through the model at once."""

    unit = "score"

    metrics: Annotated[tuple[str, ...], Parse(comma_list), Registered(METRICS)] = option(
        ("bi",), "layer-importance metrics to score, comma-separated (repeats are scored once)", metavar="METRIC,...")
    batch_size: int = option(8, "rows per forward pass", minimum=1)

    @field_validator("metrics")
    @classmethod
    def _once_each(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        """Each metric once, in the order first given: a metric named twice is scored once."""
        return tuple(dict.fromkeys(metrics))

    def check(self) -> None:
        if not self.metrics:
            self.refuse("metrics", f"names no metric; choose from: {', '.join(METRICS.names())}")

    def record(self) -> dict[str, Any]:
        """The config as the scores' JSON records it."""
        return self.model_dump(mode="json")


DEFAULT_SCORE = ScoreConfig()


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Validate metric names (``"bi,ppl"`` or a list) before any work; returns them deduplicated."""
    names = metrics.split(",") if isinstance(metrics, str) else metrics
    return list(ScoreConfig(metrics=tuple(name.strip() for name in names if name.strip())).metrics)
