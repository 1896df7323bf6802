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
from typing import Annotated, Any

from pydantic import SerializeAsAny, model_validator

from layerprune.data import check_source
from layerprune.data.calibration import SAMPLINGS
from layerprune.errors import OptionError, UsageError
from layerprune.healing.data import TrainingSet
from layerprune.models.loading import LoadedModel
from layerprune.options import (
    Config, NO_FLAG, SEED_RANGE, Registered, build_options, option, options_of, refuse_unknown,
)
from layerprune.registry import Registry

PRECISIONS = ("auto", "float32", "bfloat16")
"""``--dtype``'s words for the training precision: ``auto`` is bfloat16 autocast on a GPU that
supports it and float32 everywhere else."""


SELF_GENERATED = "self-generated"
"""The ``data`` that names the original's own continuations of prompts (``healing.self_generated``)."""


HEALERS: Registry[type[Healer]] = Registry("healing method")
"""Every healing method by name; :class:`HealConfig` refuses a name it does not hold."""


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
    seed: int = option(0, "data sampling and batch order seed", minimum=SEED_RANGE[0],
                       maximum=SEED_RANGE[1])
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


class HealConfig(Config):
    """One healing run: the method, its data and original, the options every method shares, the
    method's own options, and where checkpoints go; also the fingerprint a resumed run must match.

    :func:`~layerprune.healing.heal` builds it from its keywords, a recipe's ``heal`` section is read
    as its keys and ``layerprune heal``'s flags are generated from its parts, so the three refuse a bad
    value alike. The shared and the method's own options are given flat (``steps=50, lora_rank=8``),
    as the flags and a recipe give them: each goes to the class that declares it, :class:`TrainingOptions`
    or the method's ``options_class``, and a key of neither (another method's) is refused naming the
    method. ``options`` is always an instance of the method's own class (``None`` for a method without).
    """

    unit = "heal"

    method: Annotated[str | None, Registered(HEALERS)] = option(
        None, "healing method: a registered one (each listed with its own options under Healing methods)")
    data: str | Path | None = option(None, "training text (wiki-sample, news-sample, a file, a hub name: its train "
                                     "split), an Alpaca JSON/JSONL instruction file (loss on the response only), or "
                                     f"{SELF_GENERATED}: the original's own greedy continuations of prompts")
    prompts: str | Path | None = option(None, f"with data {SELF_GENERATED}: the text whose train split gives the "
                                        "prompts the original continues (a data set or a file)", metavar="SOURCE")
    prompt_tokens: int = option(32, f"with data {SELF_GENERATED}: text tokens of each prompt (in the chat template's "
                                "user turn for a tokenizer with one); the original continues it to seq_len tokens",
                                minimum=1)
    original: str | Path | None = option(None, "the unpruned model: the teacher, and the source of a replacement's "
                                         "training pairs (default: the source_model of the pruned model's "
                                         "layerprune.json)")
    training: TrainingOptions = option(TrainingOptions(), "the options every method shares, given flat (steps, "
                                       "batch_size, ...)", flag=NO_FLAG)
    options: SerializeAsAny[Config] | None = option(None, "the method's own options, given flat (lora_rank, block, "
                                                    "...)", flag=NO_FLAG)
    checkpoint_dir: str | Path | None = option(None, "where training checkpoints go (none: no checkpoints)")
    resume: bool = option(False, "continue the run checkpointed in checkpoint_dir")

    @model_validator(mode="before")
    @classmethod
    def _sort_flat_options(cls, values: Any) -> Any:
        """The flat options to :class:`TrainingOptions` and the method's own class, each built and
        checked naming the method (``steps of lora must be int``); runs before the values are checked
        against the declarations, which know neither."""
        if not isinstance(values, dict):
            return values
        method = values.get("method")
        if method is None:
            cls.refuse("method", f"is needed: name one of {', '.join(HEALERS.names())}")
        own = HEALERS.get(method).options_class
        values = dict(values)
        flat = {name: values.pop(name) for name in list(values) if name not in cls.model_fields}
        shared = [option.name for option in options_of(TrainingOptions)]
        refuse_unknown(flat, [*shared, *(option.name for option in options_of(own))], unit=method)
        values["training"] = _built(TrainingOptions, values.get("training"),
                                    {name: value for name, value in flat.items() if name in shared}, method)
        if own is not None:
            values["options"] = _built(own, values.get("options"),
                                       {name: value for name, value in flat.items() if name not in shared}, method)
        return values

    def check(self) -> None:
        """The data is named, the options are the method's own, and checkpointing has somewhere to write."""
        if self.data is None:
            self.refuse("data", "is needed: name the training text or instruction file")
        if self.self_generated and self.prompts is None:
            self.refuse("prompts", f"is needed with data {SELF_GENERATED}: name the text the prompts come from")
        if self.prompts is not None and not self.self_generated:
            self.refuse("prompts", f"applies to data {SELF_GENERATED} only; drop it or use that data")
        if self.self_generated and self.training.sampling != "random":
            raise OptionError.about("sampling", f"{self.training.sampling} applies to text windows; {SELF_GENERATED} "
                                                "data draws its prompts at random; leave sampling unset")
        if self.self_generated and self.prompt_tokens >= self.training.seq_len:
            self.refuse("prompt_tokens", f"{self.prompt_tokens} leaves no room for a continuation in seq_len "
                                         f"{self.training.seq_len} tokens; use fewer prompt tokens or a longer seq_len")
        own = HEALERS.get(str(self.method)).options_class
        given = type(self.options) if self.options is not None else None
        if given is not own:  # another method's options (a subclass of the method's own is another's too)
            raise UsageError(f"{self.method} takes {own.__name__ if own else 'no options'}, got "
                             f"{given.__name__ if given else 'none'}; give the method's own options")
        if (self.resume or self.training.checkpoint_every) and self.checkpoint_dir is None:
            self.refuse("checkpoint_dir", "is needed to checkpoint or resume: name a folder for the checkpoints")

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (0 = none): the option, or its default, a quarter of the steps."""
        if self.checkpoint_dir is None:
            return 0
        every = self.training.checkpoint_every
        return max(1, self.training.steps // 4) if every is None else every

    @property
    def self_generated(self) -> bool:
        """Whether the training rows are the original's own continuations (``healing.self_generated``)."""
        return str(self.data) == SELF_GENERATED

    def check_inputs(self) -> None:
        """Refuse a training or prompt source that does not exist (the hub asked for a hub name): before
        any model is loaded, or the original generates for nothing."""
        check_source(str(self.prompts) if self.self_generated else str(self.data))

    @property
    def distill(self) -> bool:
        return isinstance(self.options, DistillOptions) and self.options.distill

    def fingerprint(self) -> dict[str, Any]:
        """The settings that must not change between an interrupted run and its resumption."""
        training = self.training.model_dump(mode="json", exclude={"checkpoint_every"})
        own = self.options.model_dump(mode="json") if self.options is not None else {}
        prompts = {"prompts": str(self.prompts), "prompt_tokens": self.prompt_tokens} if self.self_generated else {}
        return {"method": self.method, "data": str(self.data), **prompts, **training, **own}

    def record(self) -> dict[str, Any]:
        """What ``layerprune.json`` records of the run (its healing entry's ``config``): everything
        but where the checkpoints went, a fact of the machine it ran on and not of the healing."""
        return self.model_dump(mode="json", exclude={"checkpoint_dir", "resume"})


def _built(options_class: type[Config], given: Any, flat: dict[str, Any], method: str) -> Any:
    """``options_class`` from a given instance or mapping and flat options over it, its refusals
    naming ``method``; a given value of another kind is left for the declaration to refuse."""
    if isinstance(given, options_class) and not flat:
        return given
    if given is None or isinstance(given, (dict, options_class)):
        base = given.model_dump() if isinstance(given, options_class) else dict(given or {})
        return build_options(options_class, {**base, **flat}, unit=method)
    return given


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

    def needs_original(self, settings: HealConfig) -> bool:
        return settings.distill

    def rows_to_draw(self, training: TrainingOptions) -> int:
        """Sequences to load for the run: ``--samples``, by default one per step and batch row."""
        return training.num_samples

    def check_settings(self, settings: HealConfig, num_layers: int | None) -> None:
        """Validation that needs no model, only the layer count where known (``None``: unknown), so a
        recipe can refuse bad healing settings before its first stage, reading the count from
        ``config.json``."""

    def check(self, loaded: LoadedModel, settings: HealConfig) -> None:
        """Cheap validation against the loaded model, before data or the original are loaded."""
        self.check_settings(settings, loaded.num_layers)

    @abstractmethod
    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealConfig,
            original: LoadedModel | None) -> HealOutcome:
        """Train and return the healed model (``loaded`` itself or a new model)."""

