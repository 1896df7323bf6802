"""What a training-free repair runs: :class:`RepairConfig`, the one declaration of the repair stage.

:func:`layerprune.repair.compensate` builds it from its keywords (whose defaults are its
declarations), a recipe's ``repair`` section and ``layerprune prune --compensate`` with its flags
build it from flat keys (:meth:`RepairConfig.from_flat`: the method's own options beside
``method`` and ``batch_size``), and ``layerprune.json`` records it in each ``repairs`` entry.
The method's own options stay its ``options_class``; the config holds them as ``options``, whose
type is the one its ``method`` declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, NoReturn

from pydantic import SerializeAsAny, model_validator

from layerprune.errors import OptionError, UsageError
from layerprune.options import (
    NO_FLAG, Config, Registered, build_options, declaration, option, options_of, within,
)
from layerprune.repair.base import REPAIRS, RepairMethod


class RepairConfig(Config):
    """Which repair, its statistics pass's batch, and the method's own options."""

    unit = "repair"

    method: Annotated[str | None, Registered(REPAIRS)] = option(
        None, "the training-free repair: replace-linear (ReplaceMe), rescale (Prune&Comp) or merge (LaCo); none: no "
        "repair", flag="--compensate")
    batch_size: int = option(8, "rows per forward pass of the statistics pass", minimum=1)
    options: SerializeAsAny[Config] | None = option(
        None, "the method's own options: its options_class, or a mapping of them (none: its defaults)", flag=NO_FLAG)

    @model_validator(mode="before")
    @classmethod
    def _method_options(cls, values: Any) -> Any:
        """``options`` given as a mapping becomes the method's own options class (checked, named by
        the method), before the declared checks run: which class it must be depends on ``method``."""
        if isinstance(values, dict) and isinstance(values.get("options"), dict):
            method = values.get("method")
            if method is None or method in REPAIRS:  # an unknown method is refused by its declaration
                own = cls._options_class(method)
                with within("options"):  # named by its path, as the caller passed it
                    values = {**values, "options": build_options(own, values["options"], unit=str(method))}
        return values

    def check(self) -> None:
        if self.options is None:
            return
        own = self._options_class(self.method)
        if not isinstance(self.options, own):
            self.refuse("options", f"of {self.method} are a {own.__name__}, got {type(self.options).__name__}")

    @classmethod
    def _options_class(cls, method: str | None) -> type[Config]:
        """The options class of ``method``, where options are given: refused without a method, or for
        a method that takes none."""
        if method is None:
            raise UsageError("options are a repair method's; choose the method too, or leave the options out")
        own = REPAIRS.get(method).options_class
        if own is None:
            cls.refuse("options", f"are not taken by {method}, which has no options; leave them out")
        return own

    @property
    def repairer(self) -> RepairMethod:
        """The method this config runs; refused when none was chosen."""
        if self.method is None:
            self.refuse("method", f"is not given; choose one of: {', '.join(REPAIRS.names())}")
        return REPAIRS.get(self.method)

    @property
    def method_options(self) -> Config | None:
        """The method's options as it runs them: the given ones, or its class's defaults (none for a
        method without options)."""
        own = self.repairer.options_class
        return self.options if self.options is not None or own is None else own()

    def record(self) -> dict[str, Any]:
        """The config as ``layerprune.json``'s ``repairs`` entries record it (the options resolved)."""
        resolved = self.method_options
        return {"method": self.method, "batch_size": self.batch_size,
                "options": resolved.model_dump() if resolved is not None else {}}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RepairConfig:
        """A repair section's keys (or the flags): ``method`` and ``batch_size`` beside the method's
        own options, as a recipe writes them; an option another method declares is refused naming
        that method."""
        own = {key: value for key, value in values.items() if key in ("method", "batch_size")}
        method = cls(**own).repairer
        declared = {o.name for o in options_of(method.options_class)}
        for key in values:
            if key not in own and key not in declared:
                _refuse_elsewhere(key, method.name)
        given = {key: value for key, value in values.items() if key in declared}
        options = build_options(method.options_class, given, unit=method.name) if given else None
        return cls(**own, options=options)


def _refuse_elsewhere(key: str, method: str) -> NoReturn:
    """Refuse option ``key``, not one of ``method``'s: naming the method that declares it."""
    owners = [name for name, other in REPAIRS.registered() if key in {o.name for o in options_of(other.options_class)}]
    if not owners:
        raise UsageError(f"option {key} is not available for {method}; the options of a repair are: method, "
                         "batch_size and its method's own")
    owner = declaration(REPAIRS.get(owners[0]).options_class, key)
    raise OptionError(key, owner.flag, f"is an option of {' and '.join(owners)}, not of {method}; leave it out or "
                                       f"choose {owners[0]}")


DEFAULT_REPAIR = RepairConfig()
