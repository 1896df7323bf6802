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

GRANULARITIES = ("layer", "sublayer")
"""What a score ranks: whole decoder layers, or each layer's attention and MLP branch apart (units
``attn.i`` and ``mlp.i``, :mod:`layerprune.models.sublayers`)."""


class ScoreConfig(Config):
    """Which metrics score the layers (or their branches), and how many calibration rows go through
    the model at once."""

    unit = "score"

    metrics: Annotated[tuple[str, ...], Parse(comma_list), Registered(METRICS)] = option(
        ("bi",), "layer-importance metrics to score, comma-separated (repeats are scored once)", metavar="METRIC,...")
    batch_size: int = option(8, "rows per forward pass", minimum=1)
    granularity: str = option("layer", "layer: score whole decoder layers; sublayer: score each attention and MLP "
                              "branch apart (units attn.N, mlp.N), and --remove then counts decoder parameters",
                              choices=GRANULARITIES)

    @field_validator("metrics")
    @classmethod
    def _once_each(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        """Each metric once, in the order first given: a metric named twice is scored once."""
        return tuple(dict.fromkeys(metrics))

    def check(self) -> None:
        if not self.metrics:
            self.refuse("metrics", f"names no metric; choose from: {', '.join(METRICS.names())}")
        if self.granularity == "sublayer":
            refused = [name for name in self.metrics if METRICS.get(name).sublayer_refusal is not None]
            if refused:
                able = [name for name in METRICS.names() if METRICS.get(name).sublayer_refusal is None]
                self.refuse("granularity", f"sublayer: {', '.join(refused)} "
                            f"{METRICS.get(refused[0]).sublayer_refusal}; score branches with {', '.join(able)}")

    def record(self) -> dict[str, Any]:
        """The config as the scores' JSON records it."""
        return self.model_dump(mode="json")


DEFAULT_SCORE = ScoreConfig()


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Validate metric names (``"bi,ppl"`` or a list) before any work; returns them deduplicated."""
    names = metrics.split(",") if isinstance(metrics, str) else metrics
    return list(ScoreConfig(metrics=tuple(name.strip() for name in names if name.strip())).metrics)
