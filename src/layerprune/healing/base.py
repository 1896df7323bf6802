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

from layerprune.errors import UsageError
from layerprune.healing.data import TrainingSet
from layerprune.models.loading import LoadedModel
from layerprune.registry import Registry

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class HealSettings:
    """Every knob of one healing run; also the fingerprint a resumed run must match."""

    method: str = ""
    data: str = ""
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None
    seq_len: int = 256
    samples: int | None = None
    seed: int = 0
    train_layers: int = 3
    lora_rank: int = 16
    distill: bool = False
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    block: tuple[int, int] | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    resume: bool = False
    gradient_checkpointing: bool = False
    precision: str = "auto"

    def check(self) -> None:
        """Refuse impossible settings before any model or data is loaded."""
        positive = {"steps": self.steps, "batch_size": self.batch_size, "seq_len": self.seq_len,
                    "train_layers": self.train_layers, "lora_rank": self.lora_rank}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.lr is not None and self.lr <= 0:
            raise UsageError(f"learning rate must be positive, got {self.lr}")
        if self.samples is not None and self.samples < self.batch_size:
            raise UsageError(f"samples ({self.samples}) must be at least the batch size ({self.batch_size})")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UsageError(f"distill-weight must lie in [0, 1] (1 = KL only), got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise UsageError(f"distill-temperature must be positive, got {self.distill_temperature}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; use one of: {', '.join(PRECISIONS)}")
        if self.checkpoint_every < 0:
            raise UsageError(f"checkpoint-every must be >= 0 (0 = never), got {self.checkpoint_every}")
        if (self.resume or self.checkpoint_every) and self.checkpoint_dir is None:
            raise UsageError("checkpointing and --resume need a checkpoint folder; pass --checkpoint-dir")
        if self.block is not None and not 0 <= self.block[0] < self.block[1] - 1:
            raise UsageError(f"block {self.block[0]}-{self.block[1] - 1} must name at least two consecutive layers")

    @property
    def num_samples(self) -> int:
        """Training sequences to draw: by default enough that no sequence repeats."""
        return self.samples if self.samples is not None else self.steps * self.batch_size

    def fingerprint(self) -> dict[str, Any]:
        """The settings that must not change between an interrupted run and its resumption."""
        ignored = {"checkpoint_dir", "checkpoint_every", "resume"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k not in ignored}


@dataclass
class HealOutcome:
    """The healed model and the facts about the run that go into the lineage."""

    loaded: LoadedModel
    summary: str
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Healer(ABC):
    """One healing method. ``needs_original`` says whether ``run`` gets the unpruned model."""

    default_lr: float = 1e-4
    supports_distill: bool = False
    rebuilds_from_original: bool = False
    """True when the result is built from the original's weights (so an unpruned input is its own original)."""
    options_class: type | None = None
    """The method's own options (a frozen dataclass, see the design contract), or None."""

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def needs_original(self, settings: HealSettings) -> bool:
        return settings.distill

    def check_settings(self, settings: HealSettings, num_layers: int | None) -> None:
        """Validation that needs no model, only the layer count where known (``None``: unknown), so a
        recipe can refuse bad healing settings before its first stage, reading the count from
        ``config.json``."""
        if settings.distill and not self.supports_distill:
            raise UsageError(f"--distill is not available for {settings.method}; use it with partial-ft, lora or qlora")

    def check(self, loaded: LoadedModel, settings: HealSettings) -> None:
        """Cheap validation against the loaded model, before data or the original are loaded."""
        self.check_settings(settings, loaded.num_layers)

    @abstractmethod
    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealSettings,
            original: LoadedModel | None) -> HealOutcome:
        """Train and return the healed model (``loaded`` itself or a new model)."""


HEALERS: Registry[type[Healer]] = Registry("healing method")
