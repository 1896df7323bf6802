"""Layer-importance metrics, one registered unit each, and :func:`score` to run them.

Every metric returns one importance value per decoder layer where **higher = more important**
(see :mod:`layerprune.scoring.base`). ``bi``, ``angular`` and ``block-cosine`` share one forward
pass; ``ppl`` reuses each layer's cached input instead of L full passes.
"""

from layerprune.registry import import_package_modules
from layerprune.scoring.accumulators import SimilarityAccumulator
from layerprune.scoring.base import METRICS, Metric, MetricResult, ScoringContext
from layerprune.scoring.config import DEFAULT_SCORE, ScoreConfig, check_metrics
from layerprune.scoring.report import ScoreReport, check_score_options, rescorer, score

import_package_modules(__name__, __path__)  # every metric module registers its metrics

__all__ = ["DEFAULT_SCORE", "METRICS", "Metric", "MetricResult", "ScoreConfig", "ScoreReport", "ScoringContext",
           "SimilarityAccumulator", "check_metrics", "check_score_options", "rescorer", "score"]
