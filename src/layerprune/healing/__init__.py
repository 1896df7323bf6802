"""Healing a pruned model: replacement modules, partial fine-tuning, LoRA/QLoRA, distillation, and the
training-free repairs of :mod:`layerprune.repair`.

Each method is one registered unit in :data:`HEALERS`; importing this package registers them all.
"""

from layerprune.data import TrainingSet
from layerprune.healing import lora, partial, replacement  # noqa: F401  (registers the methods)
from layerprune.healing.base import HEALERS, DistillOptions, Healer, HealOutcome, HealSettings, TrainingOptions
from layerprune.healing.heal import heal
from layerprune.repair import healers as _training_free  # noqa: F401,E402  (registers replace-linear, rescale, merge)

__all__ = ["HEALERS", "DistillOptions", "HealOutcome", "HealSettings", "Healer", "TrainingOptions", "TrainingSet",
           "heal"]
