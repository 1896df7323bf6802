"""Typed options: one declaration per stage and per registered unit, read by the CLI, the recipes, the
API and the docs.

A pipeline stage's options (e.g. :class:`~layerprune.data.CalibrationConfig`) and a registered unit's
own options (a metric, healing method, repair or strategy names its class in ``options_class``) are a
:class:`Config`: a frozen pydantic model whose fields are declared with :func:`option`::

    class LoRAOptions(DistillOptions):
        lora_rank: int = option(16, "adapter rank r (alpha = 2r)", minimum=1)

Each field has a type, a default and one help sentence; optionally ``choices``, ``minimum`` /
``maximum`` (inclusive), ``flag`` (a custom flag name) and ``metavar``, and, for flag texts argparse
cannot read, a :class:`Parse` in the type's ``Annotated`` metadata. Cross-field rules go in
``check(self)``. This module turns the declaration into argparse flags, validated instances and
Markdown tables, so an option is written once and its default is the same on the command line, in a
recipe and in Python (recipe keys: :func:`layerprune.recipes.schema.option_fields`). A config
validates itself whenever it is built, whatever built it: a flag, a recipe key or a keyword argument
is checked by the same :meth:`Option.check`, and a bad value raises an
:class:`~layerprune.errors.OptionError` that each front-end words as its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticUndefined

from layerprune.errors import OptionError, UsageError
from layerprune.registry import Registry

# typing.get_origin() gives the collections.abc class for both typing.Sequence[X] and
# collections.abc.Sequence[X]; a recipe writes every one of these as a YAML list
LIST_ORIGINS = (list, tuple, Sequence, Iterable)


@dataclass(frozen=True)
class Option:
    """One declared option, read off a dataclass field."""

    name: str
    annotation: Any
    default: Any
    help: str
    flag: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    registry: Registry[Any] | None = None
    """Where the value names a registered unit (see :class:`Registered`): its choices are that registry's names."""

    @property
    def base_type(self) -> Any:
        """The annotation without ``| None``: what a given (non-null) value must be."""
        if typing.get_origin(self.annotation) in (typing.Union, types.UnionType):
            args = [arg for arg in typing.get_args(self.annotation) if arg is not type(None)]
            return args[0] if len(args) == 1 else typing.Union[tuple(args)]
        return self.annotation

    def check(self, value: Any, unit: str) -> None:
        """Refuse a value of the wrong type, outside the choices or out of range, naming the option."""
        if not matches(value, self.annotation):
            self.refuse(f"of {unit} must be {type_name(self.annotation)}, got {value!r}; fix its value")
        if value is None:
            return
        if isinstance(value, float) and not math.isfinite(value):
            self.refuse(f"of {unit} must be a finite number, got {value}; fix its value")
        if self.choices is not None:
            for item in value if self.is_list else [value]:
                if item not in self.choices:
                    self.refuse_choice(item, unit)
        if self.minimum is not None and value < self.minimum:
            self.refuse(f"must be at least {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            self.refuse(f"must be at most {self.maximum}, got {value}")

    @property
    def is_list(self) -> bool:
        """Whether the value is a list (whose every entry must then be one of the choices)."""
        base = self.base_type
        return typing.get_origin(base) in LIST_ORIGINS or base in (list, tuple)

    def refuse_choice(self, value: Any, unit: str) -> NoReturn:
        """Refuse ``value``, not one of the choices: a registered unit's name in its registry's words."""
        listed = ", ".join(map(str, self.choices or ()))
        if self.registry is not None:
            self.refuse(f"names an unknown {self.registry.kind} {value!r}; choose one of: {listed}")
        self.refuse(f"{value!r} is not a choice of {unit}; use one of: {listed}")

    def refuse(self, problem: str) -> NoReturn:
        """Raise ``problem`` about this option, for each front-end to name it its own way."""
        raise OptionError(self.name, self.flag, problem)


def options_of(config_class: type[Config] | None) -> list[Option]:
    """The options ``config_class`` declares (none for ``None``), in declaration order: its fields with the
    metadata :func:`option`, :class:`Parse` and :class:`Registered` stored."""
    if config_class is None:
        return []
    hints = typing.get_type_hints(config_class)
    declared = []
    for name, info in config_class.model_fields.items():
        meta = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if info.default is PydanticUndefined and info.default_factory is None:
            raise TypeError(f"option {config_class.__name__}.{name} has no default; every option needs one")
        if not info.description:
            raise TypeError(f"option {config_class.__name__}.{name} has no help sentence")
        choices = meta.get("choices")
        reader = next((item.read for item in info.metadata if isinstance(item, Parse)), None)
        registry = next((item.registry for item in info.metadata if isinstance(item, Registered)), None)
        if registry is not None:
            choices = registry.names()
        declared.append(Option(
            name=name, annotation=hints[name], default=info.get_default(call_default_factory=True),
            help=info.description, flag=str(meta.get("flag", "--" + name.replace("_", "-"))),
            choices=tuple(choices) if isinstance(choices, list) else None, minimum=meta.get("min"),
            maximum=meta.get("max"), parse=reader, metavar=meta.get("metavar"), registry=registry,
        ))
    return declared


@dataclass(frozen=True)
class Parse:
    """How a :class:`Config` field's flag text becomes its value, for types argparse cannot read
    (``ppl: Annotated[tuple[str, ...], Parse(comma_list)] = option((), "...")``). Kept in the type's
    metadata, out of the JSON Schema."""

    read: Callable[[str], Any]


@dataclass(frozen=True)
class Registered:
    """A :class:`Config` field whose value names a unit of ``registry`` (``method: Annotated[str,
    Registered(REPAIRS)]``), or a list of such names: its choices are the registry's names when the
    options are read, not when the class is defined, so a unit that a module imported later
    registers is a choice too; an unknown name is refused in the registry's words."""

    registry: Registry[Any]


SEED_RANGE = (-(2**63), 2**64 - 1)
"""What torch's generators take as a seed: a seed option declares these bounds, so 2**70 is refused
when the option is built, not by an OverflowError inside torch."""

NO_FLAG = ""
"""An option's ``flag`` where the command line does not take it (the API and recipes do): it gets
no flag, and the docs' tables show none."""


def option(default: Any, help: str, *, flag: str | None = None, minimum: float | None = None,
           maximum: float | None = None, choices: Sequence[Any] | None = None, metavar: str | None = None) -> Any:
    """A :class:`Config` field: its default, one help sentence, and optional bounds, choices, flag name and
    metavar (kept in the field's JSON Schema, so the shipped schemas show them too)."""
    extra = {key: value for key, value in (("flag", flag), ("min", minimum), ("max", maximum), ("metavar", metavar),
                                           ("choices", list(choices) if choices is not None else None))
             if value is not None}
    return Field(default, description=help, json_schema_extra=extra or None)


class Config(BaseModel):
    """One pipeline stage's typed options: frozen, closed to unknown keys, and checked as it is built
    (every given value against its declaration, then the class's own :meth:`check`), so the Python
    API, a recipe and the command line refuse the same values with the same words. ``unit`` names
    the stage in messages."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    unit: ClassVar[str] = "options"

    @model_validator(mode="before")
    @classmethod
    def _check_given(cls, values: Any, info: ValidationInfo) -> Any:
        """Each given value against its declaration; ``build_options`` passes the unit a message names
        (a method sharing a base's options, e.g. ``lora`` for :class:`DistillOptions`)."""
        unit = (info.context or {}).get("unit", cls.unit)
        if isinstance(values, dict):
            declared = {option.name: option for option in options_of(cls)}
            refuse_unknown(values, declared, unit=unit)
            values = dict(values)
            for name, value in list(values.items()):
                declared[name].check(value, unit)
                nested = config_in(declared[name].annotation)
                if isinstance(value, dict) and nested is not None:
                    values[name] = _build_nested(nested, name, value)
        return values

    @model_validator(mode="after")
    def _check_together(self) -> Config:
        self.check()
        return self

    def check(self) -> None:
        """Rules between options (none by default): raise a :class:`UsageError` naming them and the fix
        (:meth:`refuse` where the rule is about one option's value)."""

    @classmethod
    def refuse(cls, name: str, problem: str) -> NoReturn:
        """Refuse the value of option ``name`` for ``problem`` as its declaration would (an
        :class:`OptionError` each front-end names its own way: keyword, flag, recipe key): for a rule of
        :meth:`check` or one only the run finds out."""
        declaration(cls, name).refuse(problem)


def declaration(options_class: type, name: str) -> Option:
    """The declaration of option ``name`` of ``options_class``."""
    return next(option for option in options_of(options_class) if option.name == name)


def config_in(annotation: Any) -> type[Config] | None:
    """The :class:`Config` a field holds (alone or in a union), which a mapping of its options builds."""
    arguments = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return next((arg for arg in arguments if isinstance(arg, type) and issubclass(arg, Config)), None)


def _build_nested(config_class: type[Config], name: str, values: dict[str, Any]) -> Config:
    """A nested config built from its mapping (its refusals named by their path, see :func:`within`)."""
    with within(name):
        return config_class(**values)


@contextmanager
def within(name: str) -> Iterator[None]:
    """Name an option of the config nested under ``name`` that the block refuses by its path
    (``classification.epochs``), as a recipe writes it and a Python caller passes it; its flag stays."""
    try:
        yield
    except OptionError as error:
        raise OptionError(f"{name}.{error.name}", error.flag, error.problem) from None


ConfigT = TypeVar("ConfigT", bound=Config)


def unit_options(unit: Any) -> type[Config] | None:
    """The options class a registered unit (class or instance) declares, or ``None``."""
    return getattr(unit, "options_class", None)


def build_options(options_class: type[ConfigT], values: Mapping[str, Any], *, unit: str) -> ConfigT:
    """``values`` (keyword arguments, recipe keys) as a checked ``options_class`` instance, its messages
    naming ``unit`` (a method that shares a base's options names itself, not the base).

    An unknown name is refused with the options ``unit`` does take; every value is checked against
    its declaration, then the class's own ``check()`` (rules between options) runs.
    """
    try:
        return options_class.model_validate(dict(values), context={"unit": unit})
    except ValidationError as error:  # a value its declaration let through but pydantic could not convert
        raise UsageError(f"{unit}: {error.errors()[0]['msg']}; fix its value") from None


def refuse_unknown(values: Iterable[str], allowed: Iterable[str], *, unit: str) -> None:
    """Refuse option names ``unit`` does not declare, listing the ones it does."""
    known = list(allowed)
    unknown = [name for name in values if name not in known]
    if unknown:
        raise UsageError(f"option {', '.join(unknown)} is not available for {unit}; the options of {unit} are: "
                         f"{', '.join(known) or 'none'}")


def default_text(option: Option) -> str:
    """How the default reads in help and docs; ``None`` defaults are explained by the help itself."""
    if option.default is None:
        return ""
    if isinstance(option.default, bool):
        return "on" if option.default else "off"
    if isinstance(option.default, (tuple, list)):  # written as the flag takes it; an empty list as nothing
        return ",".join(map(str, option.default))
    return str(option.default)


def add_option_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *options_classes: type | None,
                     only_given: bool = False, skip: Iterable[str] = ()) -> None:
    """Add one flag per option of ``options_classes`` to ``parser``, its default shown in the help
    (an option several classes declare, e.g. by inheritance, gets one flag).

    With ``only_given`` a flag the user does not give leaves no attribute in the namespace (the
    help still shows the real default): the caller then passes on only what was asked for, and the
    unit's own declaration supplies the rest, so no second copy of a default exists.
    """
    skipped = set(skip)
    declared = {o.name: o for options_class in options_classes for o in options_of(options_class)}
    for option in declared.values():
        if option.name in skipped or option.flag == NO_FLAG:
            continue
        shown = default_text(option)
        text = option.help
        if option.choices is not None and option.parse is not None:  # argparse lists the choices of the others
            text += f"; one of: {', '.join(map(str, option.choices))}"
        text = f"{text} (default: {shown})" if shown else text
        keywords: dict[str, Any] = {"dest": option.name, "help": text.replace("%", "%%")}
        keywords["default"] = argparse.SUPPRESS if only_given else option.default
        if option.base_type is bool:
            keywords["action"] = argparse.BooleanOptionalAction if option.default else "store_true"
        else:
            keywords["type"] = str if option.parse else _reader(option.base_type)  # parsed by given_options
            if option.choices is not None and option.parse is None:  # a parsed text is checked entry by entry
                keywords["choices"] = option.choices
            if option.metavar is not None:
                keywords["metavar"] = option.metavar
        parser.add_argument(option.flag, **keywords)


def given_options(args: argparse.Namespace, options_class: type | None) -> dict[str, Any]:
    """The options of ``options_class`` present in ``args`` (see ``only_given``), flag texts read by
    their ``parse`` here rather than inside argparse, so a bad one is a :class:`UsageError` like any
    other refusal (one line, exit 2) and not argparse's exit."""
    given = {}
    for option in options_of(options_class):
        if option.flag != NO_FLAG and hasattr(args, option.name):  # an option without a flag has no value here
            value = getattr(args, option.name)
            if option.parse and isinstance(value, str):
                try:
                    value = option.parse(value)
                except OptionError as error:  # the reader names the option itself: keep only its problem
                    option.refuse(error.problem)
                except UsageError as error:  # the reader knows the text, not the flag it came from
                    option.refuse(str(error))
            given[option.name] = value
    return given


def comma_list(text: str) -> tuple[str, ...]:
    """A comma-separated flag (``--ppl wiki-sample,news-sample``) as its entries; an empty entry
    (``a,,b``, ``a,``) is refused, since one silently dropped would run other work than was typed."""
    parts = tuple(part.strip() for part in text.split(","))
    if not all(parts):
        raise UsageError(f"{text!r} has an empty entry; separate the entries with single commas, e.g. a,b")
    return parts


def comma_choices(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: a :func:`comma_list` of names from ``choices``; an empty entry or an unknown
    name is refused with the valid ones listed (argparse names the flag and exits 2)."""
    known = list(choices)

    def parse(text: str) -> list[str]:
        try:
            chosen = comma_list(text)
        except UsageError as error:
            raise argparse.ArgumentTypeError(f"{error}; choose from {', '.join(known)}") from None
        unknown = [name for name in chosen if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        return list(chosen)
    return parse


def comma_ints(text: str) -> tuple[int, ...]:
    """A comma-separated flag of integers (``--k 1,2,4,8``)."""
    try:
        return tuple(int(part) for part in comma_list(text))
    except ValueError:
        raise UsageError(f"{text!r} must be comma-separated integers, e.g. 1,2,4,8") from None


def finite_float(text: str) -> float:
    """A float flag's reader: ``nan`` and ``inf`` are numbers to Python but never a meaningful
    setting (a learning rate of ``inf`` trains a model into non-finite weights), so argparse refuses them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a value such as 1e-4")
    return value


def _reader(annotation: Any) -> Callable[[str], Any]:
    if annotation is float:
        return finite_float
    if annotation in (int, str, Path):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) <= {str, Path}:
        return str  # a path or a name (``str | Path``): the flag's text as given
    raise TypeError(f"an option of type {annotation!r} needs metadata 'parse' to be read from the command line")


def options_table(options_class: type | None) -> list[str]:
    """Markdown table rows documenting ``options_class`` (empty without options)."""
    declared = options_of(options_class)
    if not declared:
        return []
    rows = ["| option | flag | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for option in declared:
        notes = [option.help]
        if option.choices is not None:
            notes.append(f"choices: {', '.join(map(str, option.choices))}")
        bounds = [f">= {option.minimum}" if option.minimum is not None else "",
                  f"<= {option.maximum}" if option.maximum is not None else ""]
        if any(bounds):
            notes.append(" and ".join(b for b in bounds if b))
        default = ("`None`" if option.default is None else "its options' defaults" if isinstance(option.default, Config)
                   else f"`{option.default!r}`")
        flag = f"`{option.flag}`" if option.flag != NO_FLAG else "(none)"
        rows.append(f"| `{option.name}` | {flag} | {type_name(option.annotation)} | {default} | "
                    f"{'; '.join(notes)} |")
    return rows


def type_name(annotation: Any) -> str:
    """A type hint as a user reads it: ``int or null``, ``list of str``, ``mapping``."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin in LIST_ORIGINS or annotation in (list, tuple):
        args = typing.get_args(annotation)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or annotation is dict or _is_settings(annotation):
        return "mapping"
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def matches(value: Any, annotation: Any) -> bool:
    """Whether a value (from YAML or a Python call) fits a simple type hint; lists stand for tuples."""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in LIST_ORIGINS or annotation in (list, tuple):
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False
        return all(matches(item, args[0]) for item in value) if args else True
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if _is_settings(annotation):  # a mapping of its fields, or the built settings themselves
        return isinstance(value, (dict, annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Path:
        return isinstance(value, (str, Path))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _is_settings(annotation: Any) -> bool:
    """A config or a plain settings dataclass an API function takes (e.g. a search's drop rule): what a
    recipe writes as a nested mapping."""
    return dataclasses.is_dataclass(annotation) or (isinstance(annotation, type) and issubclass(annotation, BaseModel))
