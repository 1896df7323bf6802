"""What every healing method shares: its settings, its contract and the registry that names it.

A healing method is one registered unit (``@HEALERS.register("lora")``). It receives the pruned
model, the training data and, when it needs one, the unpruned original (the source of the
replacement's training pairs, or the distillation teacher), and returns the healed model plus a
short account of what it trained. The shared training loop lives in :mod:`.engine`, so a method
only decides *which* parameters train and *what* the loss is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerprune.data.calibration import SAMPLINGS
from layerprune.errors import OptionError, UsageError
from layerprune.healing.data import TrainingSet
from layerprune.models.loading import LoadedModel
from layerprune.options import Config, option
from layerprune.registry import Registry

PRECISIONS = ("auto", "float32", "bfloat16")
"""``--dtype``'s words for the training precision: ``auto`` is bfloat16 autocast on a GPU that
supports it and float32 everywhere else."""


class TrainingOptions(Config):
    """The options every healing method shares: training data, schedule, checkpoints, precision.

    ``checkpoint_every`` defaults to a quarter of the steps wherever a checkpoint folder is given
    (the command line always gives one, a recipe too), so a killed run loses at most a quarter of
    its work; without a folder there is nothing to write and no checkpoint is taken.
    """

    unit = "healing"

    steps: int = option(100, "optimizer steps", minimum=1)
    batch_size: int = option(8, "global batch: sequences per step", minimum=1)
    lr: float | None = option(None, "peak learning rate (default: the method's own, see its docs)")
    seq_len: int = option(256, "tokens per training sequence", minimum=1)
    samples: int | None = option(None, "training sequences to draw (default: steps x batch size, so no sequence "
                                 "repeats; for a training-free repair, which takes no steps, 64 as for score's "
                                 "calibration)", minimum=1)
    seed: int = option(0, "data sampling and batch order seed")
    sampling: str = option("random", "how training windows are drawn from a text source (as for score's calibration "
                           "data)", choices=SAMPLINGS.names())
    text_field: str | None = option(None, "the field holding the text in a JSON/CSV/hub dataset")
    checkpoint_every: int | None = option(None, "checkpoint every N steps, 0 = never (default: a quarter of the steps "
                                          "when there is a checkpoint folder)", minimum=0)
    gradient_checkpointing: bool = option(False, "trade compute for activation memory")
    precision: str = option("auto", "training precision: auto (bfloat16 on capable GPUs, else float32), float32 or "
                            "bfloat16", choices=PRECISIONS)

    def check(self) -> None:
        """Rules between options, refused before any model or data is loaded."""
        if self.lr is not None and self.lr <= 0:
            raise OptionError.about("lr", f"must be positive, got {self.lr}")
        if self.samples is not None and self.samples < self.batch_size:
            raise UsageError(f"samples ({self.samples}) must be at least the batch size ({self.batch_size})")

    @property
    def num_samples(self) -> int:
        """Training sequences to draw: by default enough that no sequence repeats."""
        return self.samples if self.samples is not None else self.steps * self.batch_size


class DistillOptions(Config):
    """Knowledge distillation from the unpruned model, for the methods whose loss is next-token loss."""

    distill: bool = option(False, "add KL to the unpruned model's logits to the loss")
    distill_weight: float = option(0.5, "KL share of the loss, 1 = KL only", minimum=0.0, maximum=1.0)
    distill_temperature: float = option(1.0, "softmax temperature of the KL term")

    def check(self) -> None:
        if self.distill_temperature <= 0:
            raise OptionError.about("distill_temperature", f"must be positive, got {self.distill_temperature}")


@dataclass(frozen=True)
class HealSettings:
    """One healing run: the method, its data, the shared and the method's own options, and where
    checkpoints go; also the fingerprint a resumed run must match."""

    method: str
    data: str
    training: TrainingOptions = field(default_factory=TrainingOptions)
    options: Any = None
    """The method's own options (an instance of its ``options_class``), or ``None`` without any."""
    checkpoint_dir: Path | None = None
    resume: bool = False

    def check(self) -> None:
        """Refuse checkpointing settings that have nowhere to write."""
        if (self.resume or self.training.checkpoint_every) and self.checkpoint_dir is None:
            raise OptionError.about("checkpoint_dir", "is needed to checkpoint or resume: name a folder for the "
                                                      "checkpoints")

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (0 = none): the option, or its default, a quarter of the steps."""
        if self.checkpoint_dir is None:
            return 0
        every = self.training.checkpoint_every
        return max(1, self.training.steps // 4) if every is None else every

    @property
    def distill(self) -> bool:
        return isinstance(self.options, DistillOptions) and self.options.distill

    def fingerprint(self) -> dict[str, Any]:
        """The settings that must not change between an interrupted run and its resumption."""
        values = {"method": self.method, "data": self.data,
                  **{k: v for k, v in self.training.model_dump().items() if k != "checkpoint_every"},
                  **(self.options.model_dump() if self.options is not None else {})}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}


@dataclass
class HealOutcome:
    """The healed model and the facts about the run that go into the lineage."""

    loaded: LoadedModel
    summary: str
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Healer(ABC):
    """One healing method. ``options_class`` declares its own options (beside :class:`TrainingOptions`);
    ``needs_original`` says whether ``run`` gets the unpruned model."""

    options_class: type | None = None
    default_lr: float = 1e-4
    rebuilds_from_original: bool = False
    """True when the result is built from the original's weights (so an unpruned input is its own original)."""
    trains: bool = True
    """False for a training-free repair: it takes no optimizer steps, so the lineage records no schedule."""

    def needs_original(self, settings: HealSettings) -> bool:
        return settings.distill

    def rows_to_draw(self, training: TrainingOptions) -> int:
        """Sequences to load for the run: ``--samples``, by default one per step and batch row."""
        return training.num_samples

    def check_settings(self, settings: HealSettings, num_layers: int | None) -> None:
        """Validation that needs no model, only the layer count where known (``None``: unknown), so a
        recipe can refuse bad healing settings before its first stage, reading the count from
        ``config.json``."""

    def check(self, loaded: LoadedModel, settings: HealSettings) -> None:
        """Cheap validation against the loaded model, before data or the original are loaded."""
        self.check_settings(settings, loaded.num_layers)

    @abstractmethod
    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealSettings,
            original: LoadedModel | None) -> HealOutcome:
        """Train and return the healed model (``loaded`` itself or a new model)."""


HEALERS: Registry[type[Healer]] = Registry("healing method")
