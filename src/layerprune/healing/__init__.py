"""Healing a pruned model: replacement modules, partial fine-tuning, LoRA/QLoRA, distillation, and the
training-free repairs of :mod:`layerprune.repair`.

Each method is one registered unit in :data:`HEALERS`; importing this package registers them all.
"""

from layerprune.data import TrainingSet
from layerprune.healing.base import HEALERS, DistillOptions, HealConfig, Healer, HealOutcome, TrainingOptions
from layerprune.healing.heal import heal
from layerprune.registry import import_package_modules

import_package_modules(__name__, __path__)  # every method module registers its methods

__all__ = ["HEALERS", "DistillOptions", "HealConfig", "HealOutcome", "Healer", "TrainingOptions", "TrainingSet",
           "heal"]
