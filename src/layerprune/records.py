"""Typed, versioned JSON records: what layerprune writes for others to read (``layerprune.json``,
``search.json``, ``run.json``).

Each record is a pydantic model titled with its file name, with a ``format_version`` field (default:
the version written now; the newest one readable). Every writer passes its record through
:func:`checked`, so a file always has its model's shape; the JSON Schemas ship in the package
(``layerprune/schemas/``, written by ``python docs/gen_api.py``) for readers that do not import
layerprune. A record from before its ``format_version`` existed reads as version 1: its shape was the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from layerprune.errors import UsageError

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
RecordModel = TypeVar("RecordModel", bound=type[BaseModel])
_KNOWN: list[type[BaseModel]] = []


def known_record(model: RecordModel) -> RecordModel:
    """Register ``model`` as a record layerprune writes (a class decorator): an existing file or folder
    is recognised as layerprune's own output by holding a record that validates as one
    (:func:`is_record_file`, :func:`holds_record`), never by its name alone."""
    _KNOWN.append(model)
    return model


def is_record_file(path: Path) -> bool:
    """Whether ``path`` holds a JSON record that validates as one of the known records."""
    document = _json_mapping(path)
    return document is not None and any(_validates(model, document) for model in _KNOWN)


def holds_record(folder: Path) -> bool:
    """Whether ``folder`` holds, under its own file name, a record that validates as its model
    (``layerprune.json``, ``run.json``, ``search.json``): an output folder layerprune wrote."""
    for model in _KNOWN:
        document = _json_mapping(folder / record_name(model))
        if document is not None and _validates(model, document):
            return True
    return False


def _json_mapping(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None where there is none (no file, unreadable, not JSON, not an object)."""
    try:
        document = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _validates(model: type[BaseModel], document: dict[str, Any]) -> bool:
    try:
        model.model_validate(document)
    except ValidationError:
        return False
    return True


def record_name(model: type[BaseModel]) -> str:
    """The file a record model describes (its title, e.g. ``search.json``)."""
    return str(model.model_config["title"])


def newest_version(model: type[BaseModel]) -> int:
    """The ``format_version`` a record model writes now."""
    return int(model.model_fields["format_version"].default)


def checked(model: type[BaseModel], record: Any) -> dict[str, Any]:
    """``record`` validated as ``model``, as the JSON it is written as (with ``format_version``); a
    record that does not fit is a bug in the writer, so it raises."""
    return model.model_validate(record).model_dump(mode="json")


def read_checked(path: Path, model: type[BaseModel], fix: str) -> dict[str, Any]:
    """The record in ``path`` as written, refused with ``fix`` (what the user does about it) when
    it is not one this version of ``model`` reads."""
    name = record_name(model)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path} is unreadable; {fix}") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path} is not a {name} record (not a mapping); {fix}")
    newest = newest_version(model)
    version = document.get("format_version", newest)
    if isinstance(version, int) and version > newest:
        raise UsageError(f"{path} has format_version {version}, newer than this layerprune reads ({newest}); "
                         "upgrade layerprune")
    try:
        model.model_validate(document)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "the record"
        raise UsageError(f"{path} is not a valid {name} record ({where}: {problem['msg']}); {fix}") from None
    return document


def schema_file(model: type[BaseModel]) -> str:
    """The shipped schema's file name: ``search.json`` -> ``search.schema.json``."""
    return record_name(model).removesuffix(".json") + ".schema.json"


def schema_text(model: type[BaseModel]) -> str:
    """The JSON Schema of ``model``'s record, as shipped."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(model: type[BaseModel], folder: Path = SCHEMA_DIR) -> Path:
    """Write the shipped schema of ``model`` into ``folder`` (run by ``python docs/gen_api.py``; a
    test keeps it current)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / schema_file(model)
    target.write_text(schema_text(model))
    return target
