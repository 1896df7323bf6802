"""``layerprune.evaluate``: judge one or more models side by side in one call.

The first model is the reference (usually the original); every other one is compared with it:
perplexity, lm-eval accuracy, stability (agreement with the reference's answers), efficiency and
the classification-depth curve. All input is validated before the first model is loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerprune.errors import UsageError
from layerprune.evaluation.classification import ClassificationSettings, classification_curve
from layerprune.evaluation.efficiency import Workload, measure_efficiency
from layerprune.evaluation.harness import check_task_names, run_tasks
from layerprune.evaluation.intervals import retained_performance
from layerprune.evaluation.perplexity import check_seq_len, dataset_perplexity, resolve_ppl_source
from layerprune.evaluation.stability import stability_by_task
from layerprune.models.aliases import MODEL_ALIASES
from layerprune.models.lineage import count_parameters
from layerprune.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

ModelInput = LoadedModel | str | Path


@dataclass(frozen=True)
class EvalPlan:
    """Everything to measure; ``check`` rejects bad input before any model is loaded."""

    ppl: tuple[str, ...] = ()
    seq_len: int = 512
    max_windows: int | None = None
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 4
    efficiency: Workload | None = None
    classify: str | None = None
    classification: ClassificationSettings | None = None
    load_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, *, ppl: Sequence[str] = (), tasks: Sequence[str] = (), efficiency: Workload | bool | None = None,
           **settings: Any) -> EvalPlan:
        """The checked plan for :func:`evaluate`'s keyword arguments (``efficiency=True``: the default
        workload), refused without a model, so a recipe can check its eval section before it runs."""
        workload = Workload() if efficiency is True else (efficiency or None)
        plan = cls(ppl=tuple(ppl), tasks=tuple(tasks), efficiency=workload, **settings)
        plan.check()
        return plan

    def check(self) -> None:
        if not (self.ppl or self.tasks or self.efficiency or self.classify):
            raise UsageError("nothing to evaluate; pass --ppl, --tasks, --efficiency and/or --classify")
        for name in self.ppl:
            resolve_ppl_source(name)
        check_seq_len(self.seq_len)
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1) or (
                self.max_windows is not None and self.max_windows < 1):
            raise UsageError("--batch-size, --limit and --max-windows must be positive")
        if self.tasks:
            check_task_names(self.tasks)
        if self.efficiency:
            self.efficiency.check()
        if self.classify and self.classification is None:
            raise UsageError("--classify needs classification settings (at least --k)")
        if self.classification:
            self.classification.check()


def _check_model_input(model: ModelInput) -> None:
    """Catch a mistyped local path now, not after the first model took its time to load."""
    if isinstance(model, LoadedModel):
        return
    text = str(model)
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf")
    if text not in MODEL_ALIASES and looks_local and not Path(text).expanduser().exists():
        raise UsageError(f"model {text!r} does not exist; pass a checkpoint folder, a .gguf file, a hub id or "
                         f"one of the aliases {', '.join(MODEL_ALIASES)}")


def _unique_names(models: Sequence[LoadedModel]) -> list[str]:
    names: list[str] = []
    for loaded in models:
        name = loaded.source
        while name in names:
            name += "'"
        names.append(name)
    return names


def evaluate_one(loaded: LoadedModel, plan: EvalPlan) -> dict[str, Any]:
    """Perplexity, lm-eval tasks and the classification curve of one model."""
    result: dict[str, Any] = {"num_layers": loaded.num_layers, "parameters": count_parameters(loaded.model),
                              "removed_layers": loaded.lineage.get("removed_layers", [])}
    start = time.perf_counter()
    if plan.ppl:
        result["perplexity"] = {
            name: dataset_perplexity(loaded.model, loaded.tokenizer, name, plan.seq_len, batch_size=plan.batch_size,
                                     max_windows=plan.max_windows).as_dict()
            for name in plan.ppl
        }
    if plan.tasks:
        run = run_tasks(loaded.model, loaded.tokenizer, plan.tasks, batch_size=plan.batch_size, limit=plan.limit,
                        num_fewshot=plan.num_fewshot)
        result["tasks"] = run.metrics
        result["predictions"] = run.predictions
        result["correct"] = run.correct
    if plan.classify and plan.classification:
        from layerprune import data

        result["classification"] = classification_curve(
            loaded, data.load_labelled(plan.classify, "train"), data.load_labelled(plan.classify, "test"),
            plan.classification)
        result["classification"]["dataset"] = plan.classify
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def evaluate(model: ModelInput, *, compare: Sequence[ModelInput] = (), ppl: Sequence[str] = (), seq_len: int = 512,
             max_windows: int | None = None, tasks: Sequence[str] = (), limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 4, efficiency: Workload | bool | None = None,
             classify: str | None = None, classification: ClassificationSettings | None = None,
             **load_options: Any) -> dict[str, Any]:
    """Evaluate ``model`` (the reference) and each of ``compare`` on the same measurements.

    Models are :class:`LoadedModel` objects (scored as they are in memory) or anything
    :func:`layerprune.load_model` accepts (``load_options`` go to it). Returns
    ``{"reference": name, "models": {name: {"perplexity": {data: {"ppl", "nll", "tokens", "ci95"}},
    "tasks": {task: {"acc", "stderr", "available", "evaluated", ...}}, "predictions": ..., "correct": ...,
    "stability": ..., "retained": {"mean", "ci95", "tasks"}, "efficiency": ..., "classification": ...}},
    "settings": ...}``. ``tasks`` may name groups: ``lp_offline`` (the offline suite) or ``paper``
    (the papers' lm-eval tasks, online). Every compared model's ``retained`` is its retained
    performance against the reference, with a paired bootstrap interval (``evaluation.intervals``).
    """
    plan = EvalPlan.of(ppl=ppl, seq_len=seq_len, max_windows=max_windows, tasks=tasks, limit=limit,
                       num_fewshot=num_fewshot, batch_size=batch_size, efficiency=efficiency, classify=classify,
                       classification=classification, load_options=load_options)
    inputs = [model, *compare]
    for item in inputs:
        _check_model_input(item)
    loaded = [item if isinstance(item, LoadedModel) else load_model(item, **load_options) for item in inputs]
    if plan.classification:
        plan.classification.check(min(m.num_layers for m in loaded))
    names = _unique_names(loaded)
    results = {}
    for name, one in zip(names, loaded):
        log.info("evaluating %s", name)
        results[name] = evaluate_one(one, plan)
    reference = names[0]
    for name in names[1:]:
        if "predictions" in results[name]:
            results[name]["stability"] = stability_by_task(results[reference]["predictions"],
                                                           results[name]["predictions"])
        if results[name].get("correct"):
            results[name]["retained"] = retained_performance(results[reference]["correct"], results[name]["correct"])
    if plan.efficiency:
        measured = measure_efficiency({name: one.model for name, one in zip(names, loaded)}, plan.efficiency)
        for name in names:
            results[name]["efficiency"] = measured[name]
    settings = {key: value for key, value in vars(plan).items() if key not in ("efficiency", "classification",
                                                                               "load_options")}
    settings["efficiency"] = vars(plan.efficiency) if plan.efficiency else None
    return {"reference": reference, "models": results, "settings": settings}
