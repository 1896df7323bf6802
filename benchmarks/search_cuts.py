"""What the search benchmarks (sublayers.py, evolution.py) share: the cuts chosen from what a search
ranked, each rebuilt as the search built it, the ``lp_offline`` reading RP is computed from, and the
cost and environment lines their results carry.

Imported by name from beside those scripts: each puts its own folder on ``sys.path``, so this loads
both when a script runs as ``python benchmarks/<script>.py`` and when a test imports one as a module.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

import layerprune as lp
from layerprune.data import CalibrationSet, calibrate
from layerprune.data.calibration import CalibrationConfig
from layerprune.evaluation.harness import run_tasks
from layerprune.searching.candidates import Candidate, cut
from layerprune.searching.config import SearchConfig

KINDS = ("whole layers", "sub-layer")
FORMS = ("plain", "repaired")
TASKS = ["lp_offline"]
NOT_RUN = "not run"


def cut_kind(candidate: dict[str, Any]) -> str:
    """A cut that removes a lone attention or MLP is a sub-layer cut, whatever found it (a branch
    selection that takes both of every layer's branches is a whole-layer cut)."""
    return KINDS[1] if candidate["removed_attention"] or candidate["removed_mlp"] else KINDS[0]


def form_of(candidate: dict[str, Any]) -> str:
    """``plain`` (removal alone) or ``repaired`` (with a training-free repair)."""
    return FORMS[candidate["repair"] is not None]


def kind_and_form(candidate: dict[str, Any]) -> str:
    return f"{cut_kind(candidate)}, {form_of(candidate)}"


def choose(tried: list[dict[str, Any]],
           slot: Callable[[dict[str, Any]], str] = kind_and_form) -> dict[str, dict[str, Any]]:
    """Per ``slot`` (by default kind of cut and form), the candidate with the lowest held-out perplexity
    in the search's ranking. One the search dropped early has only a running perplexity on its first
    windows, which cannot be set against a full one: it is chosen only for a slot that no fully ranked
    candidate fills (the tables mark it), so that every slot the search tried is read on the test text."""
    chosen: dict[str, dict[str, Any]] = {}
    for candidate in sorted(tried, key=lambda c: (c["dropped_early"], c["held_out_ppl"])):
        chosen.setdefault(slot(candidate), candidate)
    return chosen


def candidate_of(record: dict[str, Any]) -> Candidate:
    """The :class:`Candidate` a search's record of it describes (to rebuild the cut)."""
    return Candidate(record["removed_layers"], record["metric"], record["strategy"], repair=record["repair"],
                     attention=record["removed_attention"], mlp=record["removed_mlp"],
                     granularity=record["granularity"])


def calibration_of(recorded: dict[str, Any]) -> CalibrationConfig:
    """The calibration a ``search.json`` records (what its repairs were fitted on), as a config again."""
    return CalibrationConfig(**{name: value for name, value in recorded.items()
                                if name in CalibrationConfig.model_fields})


def calibration_rows(loaded: lp.LoadedModel, calibration: CalibrationConfig) -> CalibrationSet:
    """The rows ``calibration`` describes, drawn as a search draws them (refused where longer than the
    model's context)."""
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    return calibrate(loaded.tokenizer, calibration, max_positions=max_positions)


class Rebuilder:
    """Rebuilds a chosen cut of ``original`` as the search built it: repairs fit on the search's own
    calibration rows (drawn once, only when they are needed)."""

    def __init__(self, original: lp.LoadedModel, calibration: CalibrationConfig) -> None:
        self.original = original
        self.calibration = calibration
        self._rows: CalibrationSet | None = None

    def rows(self) -> CalibrationSet:
        """The search's calibration rows."""
        if self._rows is None:
            self._rows = calibration_rows(self.original, self.calibration)
        return self._rows

    def __call__(self, record: dict[str, Any]) -> lp.LoadedModel:
        rows = self.rows() if record["repair"] is not None else None
        return cut(self.original, candidate_of(record), rows, SearchConfig().batch_size)


def task_reading(loaded: lp.LoadedModel, task_limit: int) -> dict[str, Any]:
    """The offline suite's per-example correctness (what RP and its paired intervals are computed from)
    and per-task accuracy, ``task_limit`` examples per task."""
    tasks = run_tasks(loaded.model, loaded.tokenizer, TASKS, limit=task_limit, batch_size=8)
    return {"correct": tasks.correct, "accuracy": {task: values.get("acc") for task, values in tasks.metrics.items()}}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def costed(compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute``'s result with its cost: wall-clock seconds, the 1-minute load average before it (on a
    shared machine a slow step is often a busy one), and when it ran."""
    load, start = load_average(), time.perf_counter()
    return {**compute(), "seconds": round(time.perf_counter() - start, 1), "load_before": load,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes")}


def environment() -> dict[str, Any]:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "versions": f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                        f"{transformers.__version__}, layerprune {lp.__version__}"}


def interval_text(mean: float | None, ci95: Any, pattern: str) -> str:
    if mean is None:
        return NOT_RUN
    return pattern.format(mean) + (f" [{pattern.format(ci95[0])}, {pattern.format(ci95[1])}]" if ci95 else "")
