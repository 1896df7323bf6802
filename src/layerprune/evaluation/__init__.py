"""Evaluation: perplexity, lm-eval zero-shot tasks, stability, classification depth curves, speed."""

from layerprune.evaluation.classification import ClassificationSettings, classification_curve
from layerprune.evaluation.efficiency import Workload, measure_efficiency
from layerprune.evaluation.evaluate import evaluate
from layerprune.evaluation.harness import OFFLINE_TASKS, run_tasks
from layerprune.evaluation.perplexity import PerplexityResult, perplexity
from layerprune.evaluation.stability import stability

__all__ = ["OFFLINE_TASKS", "ClassificationSettings", "PerplexityResult", "Workload", "classification_curve",
           "evaluate", "measure_efficiency", "perplexity", "run_tasks", "stability"]
