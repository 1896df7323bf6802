"""Recipe validation: every section is checked against the keyword arguments of the API function
it feeds, so the schema can never drift from the code it drives.

An unknown key, a value of the wrong type or a missing required key is reported with the recipe's
file name and line, and the keys that are allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerprune.errors import UsageError
from layerprune.recipes.yamlfile import KeyPath


# typing.get_origin() gives the collections.abc class for both typing.Sequence[X] and
# collections.abc.Sequence[X]; a recipe writes every one of these as a YAML list
LIST_ORIGINS = (list, tuple, Sequence, Iterable)


@dataclass(frozen=True)
class FieldSpec:
    """One recipe key: its Python type and whether the recipe must give it."""

    annotation: Any
    required: bool = False


def fields_of(function: Callable[..., Any], *, skip: tuple[str, ...] = ()) -> dict[str, FieldSpec]:
    """The keyword arguments of ``function`` as recipe fields (those without default are required)."""
    hints = typing.get_type_hints(function)
    fields = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        fields[name] = FieldSpec(hints.get(name, Any), parameter.default is inspect.Parameter.empty)
    return fields


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin in LIST_ORIGINS or annotation in (list, tuple):
        args = typing.get_args(annotation)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or annotation is dict or dataclasses.is_dataclass(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a (simple) type hint."""
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
        return isinstance(value, list) and all(matches(item, args[0]) for item in value) if args else isinstance(value, list)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Path:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_section(
    values: Any, fields: dict[str, FieldSpec], *, file: Path, lines: dict[KeyPath, int], path: KeyPath
) -> dict[str, Any]:
    """Validate one mapping of the recipe against ``fields``; returns it unchanged if valid."""
    where = f"{file} line {lines.get(path, '?')}" if path else str(file)
    label = f"section '{'.'.join(path)}'" if path else "the recipe"
    if not isinstance(values, dict):
        raise UsageError(f"{where}: {label} must be a mapping of keys, got {type(values).__name__}")
    for key, value in values.items():
        key_where = f"{file} line {lines.get((*path, str(key)), '?')}"
        if key not in fields:
            raise UsageError(f"{key_where}: unknown key '{key}' in {label}; allowed keys: {', '.join(sorted(fields))}")
        if not matches(value, fields[key].annotation):
            raise UsageError(
                f"{key_where}: '{key}' must be {_type_name(fields[key].annotation)}, got {value!r}; fix its value"
            )
    missing = [key for key, spec in fields.items() if spec.required and key not in values]
    if missing:
        raise UsageError(f"{where}: {label} is missing the required key(s) {', '.join(missing)}; add them")
    return values


def _dataclass_in(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((arg for arg in typing.get_args(annotation) if dataclasses.is_dataclass(arg)), None)
    return None


def build_arguments(
    values: dict[str, Any], fields: dict[str, FieldSpec], *, file: Path, lines: dict[KeyPath, int], path: KeyPath
) -> dict[str, Any]:
    """Validate ``values`` and turn them into keyword arguments: YAML lists become tuples where the
    function wants tuples, and nested mappings become the dataclasses it wants (validated too)."""
    check_section(values, fields, file=file, lines=lines, path=path)
    arguments = {}
    for key, value in values.items():
        annotation = fields[key].annotation
        settings_class = _dataclass_in(annotation)
        if isinstance(value, dict) and settings_class is not None:
            nested = fields_of(settings_class)
            value = settings_class(**build_arguments(value, nested, file=file, lines=lines, path=(*path, key)))
        elif isinstance(value, list) and "tuple" in _type_name(annotation) + repr(annotation):
            value = tuple(value)
        arguments[key] = value
    return arguments
