"""Language-model healing objectives: next-token loss and/or distillation from the unpruned model.

With ``distill``, the loss is ``(1 - w) * CE + w * T^2 * KL(teacher || student)`` per target token
(Hinton et al.'s temperature-scaled KL), the teacher being the unpruned model run alongside the
student on the same batch. ``w = 1`` distils only; without ``distill`` the loss is plain CE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerprune.healing.base import DistillOptions, HealConfig
from layerprune.healing.data import IGNORE_INDEX, TrainingSet
from layerprune.healing.engine import LossFn, TrainReport, WeightFn, train
from layerprune.models.loading import LoadedModel


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                    distillation: DistillOptions) -> torch.Tensor:
    """Summed healing loss over the target tokens of a batch (positions ``t`` predict ``t + 1``)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    student = logits[:, :-1][keep].float()
    ce = F.cross_entropy(student, targets[keep], reduction="sum")
    if teacher_logits is None:
        return ce
    temperature = distillation.distill_temperature
    teacher = teacher_logits[:, :-1][keep].float()
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  reduction="sum", log_target=True) * temperature**2
    return (1 - distillation.distill_weight) * ce + distillation.distill_weight * kl


def target_counter(data: TrainingSet) -> WeightFn:
    """Number of target tokens in the given rows: the normaliser of :func:`token_loss_sums`."""
    counts = (data.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    return lambda rows: float(counts[rows].sum())


def language_model_loss(distillation: DistillOptions, teacher: nn.Module | None) -> LossFn:
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_loss_sums(logits, batch["labels"], teacher_logits, distillation)

    return loss


def fit_language_model(model: nn.Module, data: TrainingSet, settings: HealConfig, original: LoadedModel | None,
                       *, lr: float, fingerprint: dict[str, Any], label: str) -> TrainReport:
    """Train ``model``'s trainable parameters on ``data`` with the LM (+ distillation) objective;
    ``settings.options`` is the method's options, which include :class:`DistillOptions`."""
    teacher = original.model.eval().requires_grad_(False) if settings.distill and original is not None else None
    gradient_checkpointing = settings.training.gradient_checkpointing
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    try:
        return train(model, data, language_model_loss(settings.options, teacher), target_counter(data), settings, lr=lr,
                     fingerprint=fingerprint, companions=[teacher] if teacher is not None else [], label=label)
    finally:
        model.config.use_cache = True
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()


def distill_note(distillation: DistillOptions) -> str:
    if not distillation.distill:
        return "next-token loss"
    return (f"next-token loss and distillation from the unpruned model (KL weight {distillation.distill_weight}, "
            f"temperature {distillation.distill_temperature})")
