"""``layerprune.evaluate``: judge one or more models side by side in one call.

The first model is the reference (usually the original); every other one is compared with it:
perplexity, lm-eval accuracy, stability (agreement with the reference's answers), efficiency and
the classification-depth curve. All input is validated before the first model is loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerprune import data
from layerprune.errors import UsageError
from layerprune.evaluation.against_original import compare_with_original, find_original
from layerprune.evaluation.classification import classification_curve
from layerprune.evaluation.config import EvalConfig
from layerprune.evaluation.efficiency import measure_efficiency
from layerprune.evaluation.harness import run_tasks
from layerprune.evaluation.intervals import retained_above_chance, retained_performance
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.evaluation.record import checked_report
from layerprune.evaluation.stability import stability_by_task
from layerprune.models.aliases import MODEL_ALIASES
from layerprune.models.lineage import count_parameters
from layerprune.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

ModelInput = LoadedModel | str | Path


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


def evaluate_one(loaded: LoadedModel, config: EvalConfig) -> dict[str, Any]:
    """Perplexity, lm-eval tasks and the classification curve of one model."""
    result: dict[str, Any] = {"num_layers": loaded.num_layers, "parameters": count_parameters(loaded.model),
                              "removed_layers": loaded.lineage.get("removed_layers", [])}
    start = time.perf_counter()
    if config.ppl:
        result["perplexity"] = {
            name: dataset_perplexity(loaded.model, loaded.tokenizer, name, config.seq_len,
                                     batch_size=config.batch_size, max_windows=config.max_windows).as_dict()
            for name in config.ppl
        }
    if config.tasks:
        run = run_tasks(loaded.model, loaded.tokenizer, config.tasks, batch_size=config.batch_size,
                        limit=config.limit, num_fewshot=config.num_fewshot)
        result["tasks"] = run.metrics
        result["predictions"] = run.predictions
        result["correct"] = run.correct
    if config.classify and config.classification:
        result["classification"] = classification_curve(
            loaded, data.load_labelled(config.classify, "train"), data.load_labelled(config.classify, "test"),
            config.classification)
        result["classification"]["dataset"] = config.classify
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def evaluate(model: ModelInput, *, compare: Sequence[ModelInput] = (), config: EvalConfig | None = None,
             **keywords: Any) -> dict[str, Any]:
    """Evaluate ``model`` (the reference) and each of ``compare`` on the same measurements.

    What to measure is ``config``, or an :class:`EvalConfig` built from the keywords it declares
    (``ppl``, ``seq_len``, ``tasks``, ``efficiency``, ``classify``, ``classification``, ...: one of
    the two, with the config's defaults for what is not given); the other keywords go to
    :func:`layerprune.load_model`. Models are :class:`LoadedModel` objects (scored as they are in
    memory) or anything :func:`layerprune.load_model` accepts. ``tasks`` may name groups:
    ``lp_offline`` (the offline suite) or ``paper`` (the papers' lm-eval tasks, online).

    Returns the ``eval.json`` record (:class:`layerprune.evaluation.record.EvalReport`, checked):
    ``{"format_version", "reference": name, "models": {name: {"perplexity", "tasks", "predictions",
    "correct", "stability", "retained", "retained_above_chance", "fidelity", "generation",
    "efficiency", "classification", ...}}, "settings": the config}``. Every compared model's
    ``retained`` is its retained performance against the reference, with a paired bootstrap
    interval (``evaluation.intervals``), and ``retained_above_chance`` the same above each task's
    chance rate. ``fidelity`` and ``generation`` compare every model but the original with the
    original it came from (``evaluation.against_original``: ``reference``, else the recorded
    ``source_model``, else the first model).
    """
    options = {name: value for name, value in keywords.items() if name in EvalConfig.model_fields}
    load_options = {name: value for name, value in keywords.items() if name not in options}
    if config is not None and options:
        raise UsageError(f"evaluate takes a config or the options {', '.join(options)} as keywords, not both; "
                         "put them into the config")
    config = config if config is not None else EvalConfig(**options)
    config.check_inputs()
    inputs = [model, *compare]
    for item in inputs:
        _check_model_input(item)
    loaded = [item if isinstance(item, LoadedModel) else load_model(item, **load_options) for item in inputs]
    config.check_depths(min(m.num_layers for m in loaded))
    names = _unique_names(loaded)
    # the original is found (or refused) before any measurement: a missing one must not cost the rest first
    original = find_original(loaded, config, **load_options) if config.fidelity or config.generation else None
    results = {}
    for name, one in zip(names, loaded):
        log.info("evaluating %s", name)
        results[name] = evaluate_one(one, config)
    reference = names[0]
    for name in names[1:]:
        if "predictions" in results[name]:
            results[name]["stability"] = stability_by_task(results[reference]["predictions"],
                                                           results[name]["predictions"])
        if results[name].get("correct"):
            results[name]["retained"] = retained_performance(results[reference]["correct"], results[name]["correct"])
            chance = {task: values["chance"] for task, values in results[reference]["tasks"].items()
                      if "chance" in values}
            results[name]["retained_above_chance"] = retained_above_chance(
                results[reference]["correct"], results[name]["correct"], chance)
    if original is not None:
        for name, measured in compare_with_original(original, loaded, names, config).items():
            results[name].update(measured)
    if config.workload:
        measured = measure_efficiency({name: one.model for name, one in zip(names, loaded)}, config.workload)
        for name in names:
            results[name]["efficiency"] = measured[name]
    return checked_report({"reference": reference, "models": results, "settings": config.model_dump(mode="json")})
