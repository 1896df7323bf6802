"""What every healing method shares: its settings, its contract and the registry that names it.

A healing method is one registered unit (``@HEALERS.register("lora")``). It receives the pruned
model, the training data and, when it needs one, the unpruned original (the source of the
replacement's training pairs, or the distillation teacher), and returns the healed model plus a
short account of what it trained. The shared training loop lives in :mod:`.engine`, so a method
only decides *which* parameters train and *what* the loss is.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerprune.data.calibration import SAMPLINGS
from layerprune.errors import UsageError
from layerprune.healing.data import TrainingSet
from layerprune.models.loading import LoadedModel
from layerprune.registry import Registry

PRECISIONS = ("auto", "float32", "bfloat16")
"""``--dtype``'s words for the training precision: ``auto`` is bfloat16 autocast on a GPU that
supports it and float32 everywhere else."""


@dataclass(frozen=True)
class TrainingOptions:
    """The options every healing method shares: training data, schedule, checkpoints, precision.

    ``checkpoint_every`` defaults to a quarter of the steps wherever a checkpoint folder is given
    (the command line always gives one, a recipe too), so a killed run loses at most a quarter of
    its work; without a folder there is nothing to write and no checkpoint is taken.
    """

    steps: int = field(default=100, metadata={"help": "optimizer steps", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "global batch: sequences per step", "min": 1})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: the method's own, see its docs)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence", "min": 1})
    samples: int | None = field(default=None, metadata={
        "help": "training sequences to draw (default: steps x batch size, so no sequence repeats; for a "
                "training-free repair, which takes no steps, 64 as for score's calibration)", "min": 1})
    seed: int = field(default=0, metadata={"help": "data sampling and batch order seed"})
    sampling: str = field(default="random", metadata={
        "help": "how training windows are drawn from a text source (as for score's calibration data)",
        "choices": tuple(SAMPLINGS.names())})
    text_field: str | None = field(default=None, metadata={
        "help": "the field holding the text in a JSON/CSV/hub dataset"})
    checkpoint_every: int | None = field(default=None, metadata={
        "help": "checkpoint every N steps, 0 = never (default: a quarter of the steps when there is a checkpoint "
                "folder)", "min": 0})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    precision: str = field(default="auto", metadata={
        "help": "training precision: auto (bfloat16 on capable GPUs, else float32), float32 or bfloat16",
        "choices": PRECISIONS})

    def check(self) -> None:
        """Rules between options, refused before any model or data is loaded."""
        if self.lr is not None and self.lr <= 0:
            raise UsageError(f"learning rate must be positive, got {self.lr}")
        if self.samples is not None and self.samples < self.batch_size:
            raise UsageError(f"samples ({self.samples}) must be at least the batch size ({self.batch_size})")

    @property
    def num_samples(self) -> int:
        """Training sequences to draw: by default enough that no sequence repeats."""
        return self.samples if self.samples is not None else self.steps * self.batch_size


@dataclass(frozen=True)
class DistillOptions:
    """Knowledge distillation from the unpruned model, for the methods whose loss is next-token loss."""

    distill: bool = field(default=False, metadata={"help": "add KL to the unpruned model's logits to the loss"})
    distill_weight: float = field(default=0.5, metadata={"help": "KL share of the loss, 1 = KL only",
                                                         "min": 0.0, "max": 1.0})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL term"})

    def check(self) -> None:
        if self.distill_temperature <= 0:
            raise UsageError(f"distill-temperature must be positive, got {self.distill_temperature}")


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
            raise UsageError("checkpointing and --resume need a checkpoint folder; pass --checkpoint-dir")

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
                  **{k: v for k, v in dataclasses.asdict(self.training).items() if k != "checkpoint_every"},
                  **(dataclasses.asdict(self.options) if self.options is not None else {})}
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
