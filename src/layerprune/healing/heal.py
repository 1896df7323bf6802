"""``heal()``: validate, gather data and the original model, run one registered method, record it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerprune.errors import OptionError, UsageError
from layerprune.healing.base import HEALERS, HealConfig
from layerprune.healing.data import TrainingSet, load_training_data
from layerprune.healing.engine import check_resumable, gather_for_export
from layerprune.healing.self_generated import self_generated_rows
from layerprune.models.lineage import ensure_lineage, lineage_cut
from layerprune.models.loading import LoadedModel, load_model


def heal(loaded: LoadedModel, method: str | HealConfig, data: str | Path | TrainingSet | None = None, *,
         original: str | Path | LoadedModel | None = None, **options: Any) -> LoadedModel:
    """Heal a pruned model with ``method`` (see ``HEALERS``) and return the healed model.

    ``data`` is a text source of the data layer (``wiki-sample``, a file, a hub name: its train
    split is used), an Alpaca-style JSON/JSONL instruction file, a :class:`TrainingSet`, or
    ``self-generated``: the original's greedy continuations of prompts from ``prompts`` (options
    ``prompts``, ``prompt_tokens``; cached, see :mod:`layerprune.healing.self_generated`).
    ``original`` is the unpruned model (replacement pairs, distillation teacher), loaded or named; by
    default the ``source_model`` of the pruned model's lineage.

    ``options`` are the rest of :class:`~layerprune.healing.base.HealConfig`: ``checkpoint_dir``
    (where training checkpoints go; none without it) and ``resume`` (continue the run checkpointed
    there), the :class:`~layerprune.healing.base.TrainingOptions` every method shares (``steps``,
    ``batch_size``, ``lr``, ...) and the method's own (its ``options_class``, e.g. ``lora_rank`` for
    lora, ``block`` for the replacements: the half-open run ``[start, end)`` of original layer
    indices a replacement stands in for); docs/api.md lists them all. An option the method does
    not take is refused. Instead of the method and its options, ``method`` may be a built
    :class:`HealConfig` (then only a loaded ``original`` may come beside it).

    The partial-ft and LoRA methods heal ``loaded`` in place; the replacement methods and the
    training-free repairs build the result from the original's weights and return a new model. Every
    method heals a model that removed single attention or MLP branches and keeps them removed: the
    trained ones train its heterogeneous layers as they are, the rebuilding ones cut the lineage's
    removed branches from the original again (``merge``, which repairs whole layers only, refuses).

    Under ``accelerate launch`` every process returns the same model: save it from the main process
    only. Under FSDP the processes keep their shards, and the main process's model carries the
    gathered full weights (its ``export_state``), which :func:`layerprune.save` writes.
    """
    config = heal_config(method, data, original, **options)
    healer = HEALERS.get(str(config.method))()
    healer.check(loaded, config)
    check_resumable(config, config.fingerprint())
    self_generated = config.self_generated and not isinstance(data, TrainingSet)
    if self_generated:
        config.check_inputs()  # a missing prompt source must not cost loading the original first
    needs_original = healer.needs_original(config)
    unpruned = (resolve_original(loaded, original if isinstance(original, LoadedModel) else config.original, config)
                if needs_original or self_generated else None)
    training = config.training
    if self_generated:
        rows, rows_drawn = self_generated_rows(unpruned, config, healer.rows_to_draw(training))
    else:
        rows = load_training_data(loaded.tokenizer, data if isinstance(data, TrainingSet) else str(config.data),
                                  samples=healer.rows_to_draw(training), seq_len=training.seq_len, seed=training.seed,
                                  sampling=training.sampling, text_field=training.text_field)
        rows_drawn = {"source": str(config.data), "rows": int(rows.input_ids.shape[0]), "seq_len": training.seq_len,
                      "seed": training.seed, "sampling": training.sampling}
    outcome = healer.run(loaded, rows, config, unpruned if needs_original else None)
    outcome.loaded.export_state = gather_for_export(outcome.loaded.model)
    entry: dict[str, Any] = {"method": config.method, "summary": outcome.summary, "data": rows_drawn}
    if healer.trains:  # a training-free repair took no steps: its rows and statistics are under "repairs"
        entry.update({
            "steps": training.steps,
            "batch_size": training.batch_size,
            "seq_len": training.seq_len,
            "lr": training.lr or healer.default_lr,
            "distill": config.distill,
            "first_loss": outcome.losses[0] if outcome.losses else None,
            "final_loss": outcome.losses[-1] if outcome.losses else None,
        })
    entry.update({"trainable_parameters": outcome.trainable_parameters, "train_seconds": round(outcome.seconds, 1),
                  "config": config.record()})
    ensure_lineage(outcome.loaded)["healing"].append(entry)
    return outcome.loaded


def heal_config(method: str | HealConfig, data: str | Path | TrainingSet | None = None,
                original: str | Path | LoadedModel | None = None, **options: Any) -> HealConfig:
    """:func:`heal`'s arguments as its checked :class:`HealConfig` (a given one as it is), refused
    without a model or data, so the command line and a recipe can check them before loading anything.
    A :class:`TrainingSet` is named by its description; a loaded original is :func:`heal`'s alone."""
    if isinstance(method, HealConfig):
        if data is not None or options or not isinstance(original, (LoadedModel, type(None))):
            raise UsageError("heal takes either a HealConfig or the method, data and options it is built from, not "
                             "both; put them into the config")
        return method
    named = None if isinstance(original, LoadedModel) else original
    return HealConfig(method=method, data=data.description if isinstance(data, TrainingSet) else data,
                      original=named, **options)


def resolve_original(loaded: LoadedModel, original: str | Path | LoadedModel | None,
                     config: HealConfig) -> LoadedModel:
    """The unpruned model: given, or the lineage's ``source_model``, loaded like ``loaded``.

    A replacement cuts its result out of the original; a caller's original is copied first, so
    it stays whole for its next use (another pruned model, the reference of an evaluation).
    """
    rebuilds = HEALERS.get(str(config.method)).rebuilds_from_original
    if isinstance(original, LoadedModel):
        return original.copy() if rebuilds else original
    if original is None and not lineage_cut(loaded.lineage).removes_anything:
        if rebuilds:
            return loaded
        raise OptionError.about("original", "is needed: this model has no pruning lineage (layerprune.json), so the "
                                            "unpruned teacher is unknown; name the original model")
    source = original if original is not None else loaded.lineage.get("source_model")
    if source is None:
        raise OptionError.about("original", "is needed: the pruned model's layerprune.json names no source_model; "
                                            "name the original model")
    parameter = next(loaded.model.parameters())
    dtype = parameter.dtype if parameter.dtype in (torch.float32, torch.bfloat16, torch.float16) else "auto"
    try:
        return load_model(source, dtype=dtype, device=str(parameter.device))
    except UsageError as error:
        raise OptionError.about("original", f"is needed: the original model {source!r} cannot be loaded ({error}); "
                                            "name where it is") from None
