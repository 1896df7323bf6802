"""``heal()``: validate, gather data and the original model, run one registered method, record it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerprune.errors import OptionError, UsageError
from layerprune.healing.base import HEALERS, HealSettings, TrainingOptions
from layerprune.healing.data import TrainingSet, load_training_data
from layerprune.healing.engine import check_resumable, gather_for_export
from layerprune.models.lineage import ensure_lineage
from layerprune.models.loading import LoadedModel, load_model
from layerprune.options import build_options, options_of, refuse_unknown


def heal(loaded: LoadedModel, method: str, data: str | Path | TrainingSet, *,
         original: str | Path | LoadedModel | None = None, checkpoint_dir: str | Path | None = None,
         resume: bool = False, **options: Any) -> LoadedModel:
    """Heal a pruned model with ``method`` (see ``HEALERS``) and return the healed model.

    ``data`` is a text source of the data layer (``wiki-sample``, a file, a hub name: its train
    split is used), an Alpaca-style JSON/JSONL instruction file, or a :class:`TrainingSet`.
    ``original`` is the unpruned model (replacement pairs, distillation teacher); by default the
    ``source_model`` of the pruned model's lineage. ``checkpoint_dir`` is where training
    checkpoints go (none without it) and ``resume`` continues the run checkpointed there.

    ``options`` are the :class:`~layerprune.healing.base.TrainingOptions` every method shares
    (``steps``, ``batch_size``, ``lr``, ...) and the method's own (its ``options_class``, e.g.
    ``lora_rank`` for lora, ``block`` for the replacements: the half-open run ``[start, end)`` of
    original layer indices a replacement stands in for); docs/api.md lists them all. An option
    the method does not take is refused.

    The partial-ft and LoRA methods heal ``loaded`` in place; the replacement methods build the
    result from the original's weights and return a new model. Under ``accelerate launch`` every
    process returns the same model: save it from the main process only. Under FSDP the processes
    keep their shards, and the main process's model carries the gathered full weights (its
    ``export_state``), which :func:`layerprune.save` writes.
    """
    settings = heal_settings(method, data, checkpoint_dir=checkpoint_dir, resume=resume, **options)
    healer = HEALERS.get(method)()
    healer.check(loaded, settings)
    check_resumable(settings, settings.fingerprint())
    teacher = resolve_original(loaded, original, settings) if healer.needs_original(settings) else None
    training = settings.training
    rows = load_training_data(loaded.tokenizer, data, samples=healer.rows_to_draw(training),
                              seq_len=training.seq_len, seed=training.seed, sampling=training.sampling,
                              text_field=training.text_field)
    outcome = healer.run(loaded, rows, settings, teacher)
    outcome.loaded.export_state = gather_for_export(outcome.loaded.model)
    rows_drawn = {"source": settings.data, "rows": int(rows.input_ids.shape[0]), "seq_len": training.seq_len,
                  "seed": training.seed, "sampling": training.sampling}
    entry: dict[str, Any] = {"method": method, "summary": outcome.summary, "data": rows_drawn}
    if healer.trains:  # a training-free repair took no steps: its rows and statistics are under "repairs"
        entry.update({
            "steps": training.steps,
            "batch_size": training.batch_size,
            "seq_len": training.seq_len,
            "lr": training.lr or healer.default_lr,
            "distill": settings.distill,
            "first_loss": outcome.losses[0] if outcome.losses else None,
            "final_loss": outcome.losses[-1] if outcome.losses else None,
        })
    entry.update({"trainable_parameters": outcome.trainable_parameters, "train_seconds": round(outcome.seconds, 1)})
    ensure_lineage(outcome.loaded)["healing"].append(entry)
    return outcome.loaded


def heal_settings(method: str, data: str | Path | TrainingSet, *, checkpoint_dir: str | Path | None = None,
                  resume: bool = False, **options: Any) -> HealSettings:
    """:func:`heal`'s keyword arguments (``original`` aside) as checked :class:`HealSettings`, refused
    without a model or data, so the command line and a recipe can check them before loading anything.

    Each option goes to the class that declares it: :class:`TrainingOptions` or the method's own.
    """
    healer = HEALERS.get(method)
    shared = [option.name for option in options_of(TrainingOptions)]
    own = [option.name for option in options_of(healer.options_class)]
    refuse_unknown(options, [*shared, *own], unit=method)
    training = build_options(TrainingOptions, {k: v for k, v in options.items() if k in shared}, unit=method)
    method_options = (build_options(healer.options_class, {k: v for k, v in options.items() if k in own}, unit=method)
                      if healer.options_class is not None else None)
    settings = HealSettings(
        method=method, data=data.description if isinstance(data, TrainingSet) else str(data), training=training,
        options=method_options, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        resume=resume,
    )
    settings.check()
    return settings


def resolve_original(loaded: LoadedModel, original: str | Path | LoadedModel | None,
                     settings: HealSettings) -> LoadedModel:
    """The unpruned model: given, or the lineage's ``source_model``, loaded like ``loaded``.

    A replacement cuts its result out of the original; a caller's original is copied first, so
    it stays whole for its next use (another pruned model, the reference of an evaluation).
    """
    if isinstance(original, LoadedModel):
        if not HEALERS.get(settings.method).rebuilds_from_original:
            return original
        return original.copy()
    pruned = bool(loaded.lineage.get("removed_layers"))
    if original is None and not pruned:
        if HEALERS.get(settings.method).rebuilds_from_original:
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
