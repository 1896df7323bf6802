"""Stability (LLM-Streamline): how often the pruned model answers as the original did.

Accuracy alone hides how much a pruned model changed: it can lose as many right answers as it
gains and keep its score. Stability compares the two models' *predictions* (not the gold labels)
document by document, so 1.0 means the pruned model behaves like the original on that task.
"""

from __future__ import annotations

from collections.abc import Sequence

from layerprune.errors import UsageError


def stability(reference: Sequence[int], candidate: Sequence[int], task: str = "the task") -> float:
    """Fraction of documents on which ``candidate`` picks the same answer as ``reference``."""
    if len(reference) != len(candidate):
        raise UsageError(f"cannot compare predictions on {task}: {len(reference)} vs {len(candidate)} documents; "
                         "evaluate both models with the same limit")
    if not reference:
        raise UsageError(f"no predictions to compare on {task}; stability needs a multiple-choice task")
    return sum(a == b for a, b in zip(reference, candidate)) / len(reference)


def stability_by_task(reference: dict[str, list[int]], candidate: dict[str, list[int]]) -> dict[str, float]:
    """Stability on every multiple-choice task both models were scored on."""
    shared = [task for task in reference if task in candidate and reference[task] and candidate[task]]
    return {task: stability(reference[task], candidate[task], task) for task in shared}
