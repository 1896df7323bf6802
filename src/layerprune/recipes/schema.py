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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerprune.errors import UsageError
from layerprune.options import config_in, matches, options_of, type_name
from layerprune.recipes.yamlfile import KeyPath


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


def option_fields(*options_classes: type | None) -> dict[str, FieldSpec]:
    """The options the classes declare (see :mod:`layerprune.options`) as recipe keys, all optional:
    a key the recipe leaves out takes the declaration's default, the same as the flag's and the API's."""
    return {option.name: FieldSpec(option.annotation) for options_class in options_classes
            for option in options_of(options_class)}


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
                f"{key_where}: '{key}' must be {type_name(fields[key].annotation)}, got {value!r}; fix its value"
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
    function wants tuples, and nested mappings become the dataclasses it wants (validated too). A
    nested :class:`~layerprune.options.Config`'s keys are checked here, with their lines, and stay a
    mapping: the config builds (and checks) itself from it, as from a Python caller's."""
    check_section(values, fields, file=file, lines=lines, path=path)
    arguments = {}
    for key, value in values.items():
        annotation = fields[key].annotation
        settings_class = _dataclass_in(annotation)
        nested_config = config_in(annotation)
        if isinstance(value, dict) and nested_config is not None:
            check_section(value, option_fields(nested_config), file=file, lines=lines, path=(*path, key))
        elif isinstance(value, dict) and settings_class is not None:
            nested = fields_of(settings_class)
            value = settings_class(**build_arguments(value, nested, file=file, lines=lines, path=(*path, key)))
        elif isinstance(value, list) and "tuple" in type_name(annotation) + repr(annotation):
            value = tuple(value)
        arguments[key] = value
    return arguments
