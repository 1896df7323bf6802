"""Reading YAML safely, remembering the line each key came from.

Recipes are user files: they are parsed with the safe loader only (no Python object tags), and every
validation error points at the line to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from layerprune.errors import UsageError

KeyPath = tuple[str, ...]


def _key_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], file: Path) -> None:
    """Record the line of every key, refusing a key given twice in one mapping: the YAML loader
    keeps the later value without a word, so a recipe would silently run with a setting its author
    may believe was the first one."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            line = key_node.start_mark.line + 1
            if path in lines:
                raise UsageError(f"{file} line {line}: key {'.'.join(path)!r} is given twice (first on line "
                                 f"{lines[path]}); keep one of them")
            lines[path] = line
            _key_lines(value_node, path, lines, file)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse ``path`` with the safe loader; returns the mapping and the line of every key."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise UsageError(f"recipe {file} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read recipe {file}: {error}") from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"{file}{where}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file}: a recipe must be a mapping of sections (model:, score:, ...), got {type(data).__name__}")
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _key_lines(node, (), lines, file)
    return data, lines
