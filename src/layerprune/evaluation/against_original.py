"""Fidelity and generation agreement of the evaluated models against the original they came from.

Both compare a model with *its original*, not with whichever model an evaluation lists first: two
cuts of one model are each compared with the unpruned model. The original is, in this order, the
one named (``reference``); the ``source_model`` the compared models' ``layerprune.json`` records
(one for all of them); or, when models are compared and none records one, the first model, the
evaluation's reference. A lone model with no recorded source has nothing to be compared with, and
is refused before any measurement.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from layerprune.data.prompts import draw_prompts
from layerprune.errors import OptionError, UsageError
from layerprune.evaluation.config import EvalConfig
from layerprune.evaluation.fidelity import dataset_fidelity
from layerprune.evaluation.generation import generation_agreement, side_by_side
from layerprune.models.generation import greedy_continuations
from layerprune.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

PROMPT_SEED = 0
"""Generation's prompts are one fixed draw, so every evaluation compares models on the same prompts."""


def find_original(models: Sequence[LoadedModel], config: EvalConfig, **load_options: Any) -> LoadedModel:
    """The model fidelity and generation compare with (see the module docstring): one of ``models``
    when it is the original, else loaded with ``load_options`` as the evaluated models were."""
    if config.reference is not None:
        source = str(config.reference)
    else:
        recorded = list(dict.fromkeys(str(m.lineage["source_model"]) for m in models if "source_model" in m.lineage))
        if len(recorded) > 1:
            raise OptionError.about("reference", f"is needed: the models come from different originals "
                                                 f"({', '.join(recorded)}); name the one to compare with")
        if not recorded:
            if len(models) > 1:
                return models[0]
            raise OptionError.about("reference", f"is needed for fidelity and generation: {models[0].source} records "
                                                 "no original (no layerprune.json source_model) and no model is "
                                                 "compared with it; name the original model")
        source = recorded[0]
    for model in models:
        if model.source == source and not model.lineage.get("removed_layers"):
            return model
    log.info("loading the original %s", source)
    try:
        return load_model(source, **load_options)
    except UsageError as error:
        raise OptionError.about("reference", f"cannot be loaded: {source!r} ({error}); name where the original "
                                             "model is") from None


def compare_with_original(original: LoadedModel, models: Sequence[LoadedModel], names: Sequence[str],
                          config: EvalConfig) -> dict[str, dict[str, Any]]:
    """``{name: {"fidelity": {data: ...}, "generation": ...}}`` for every model but ``original``
    (:func:`find_original`'s): what ``config`` asks of ``fidelity`` and ``generation``."""
    candidates = {name: model for name, model in zip(names, models) if model is not original}
    results: dict[str, dict[str, Any]] = {name: {} for name in candidates}
    for data in config.fidelity:
        measured = dataset_fidelity(original.model, {name: m.model for name, m in candidates.items()},
                                    original.tokenizer, data, config.seq_len, batch_size=config.batch_size,
                                    max_windows=config.max_windows)
        for name, result in measured.items():
            results[name].setdefault("fidelity", {})[data] = {**result.as_dict(), "original": original.source}
    if config.generation:
        tokenizer = original.tokenizer
        prompts = draw_prompts(tokenizer, config.generation_prompts, count=config.generation, prompt_tokens=config.prompt_tokens,
                               split="test", seed=PROMPT_SEED)
        said = greedy_continuations(original.model, prompts, config.generation_tokens, tokenizer.eos_token_id,
                                    batch_size=config.batch_size)
        settings = {"source": config.generation_prompts, "prompt_tokens": config.prompt_tokens,
                    "max_new_tokens": config.generation_tokens, "original": original.source}
        for name, model in candidates.items():
            theirs = greedy_continuations(model.model, prompts, config.generation_tokens, tokenizer.eos_token_id,
                                          batch_size=config.batch_size)
            results[name]["generation"] = {**generation_agreement(said, theirs), **settings,
                                           "examples": side_by_side(tokenizer, prompts, said, theirs)}
    return results
