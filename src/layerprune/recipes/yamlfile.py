"""Reading YAML safely, remembering the line each key came from.

Recipes are user files: they are parsed with the safe loader only (no Python object tags), and every
validation error points at the line to fix. A file someone else wrote may also be built to exhaust
memory: YAML aliases can make a few lines expand to billions of values ("billion laughs"). So the
node graph is composed first (aliases share nodes, so that costs what the text costs) and its
expanded size, depth and cycles are checked before anything is built from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from layerprune.errors import UsageError

KeyPath = tuple[str, ...]
MAX_BYTES = 1 << 20
"""A recipe is a few dozen lines; a megabyte is already far more than any needs."""
MAX_VALUES = 100_000
"""Values (scalars, lists, mappings) a recipe may expand to, aliases counted every time they are used."""
MAX_DEPTH = 50


def check_expansion(node: yaml.Node, file: Path) -> None:
    """Refuse a recipe whose aliases expand past :data:`MAX_VALUES` values or :data:`MAX_DEPTH` levels,
    or refer to themselves, before it is built: each node's expanded size is computed once (shared
    alias targets are counted from a memo), so checking a bomb costs no more than its text."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(current: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise UsageError(f"{file}: the recipe nests deeper than {MAX_DEPTH} levels; a recipe needs a few")
        if id(current) in sizes:
            return sizes[id(current)]
        if id(current) in open_nodes:
            raise UsageError(f"{file} line {current.start_mark.line + 1}: an alias refers to itself; remove the loop")
        open_nodes.add(id(current))
        children: list[yaml.Node] = []
        if isinstance(current, yaml.SequenceNode):
            children = list(current.value)
        elif isinstance(current, yaml.MappingNode):
            children = [item for pair in current.value for item in pair]
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_VALUES:
                raise UsageError(f"{file}: the recipe expands to more than {MAX_VALUES:,} values (through its "
                                 "aliases); a recipe needs a few dozen: remove the aliases that repeat")
        open_nodes.discard(id(current))
        sizes[id(current)] = total
        return total

    size(node, 0)


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
        if file.is_file() and file.stat().st_size > MAX_BYTES:
            raise UsageError(f"recipe {file} is {file.stat().st_size:,} bytes, more than a recipe can need "
                             f"({MAX_BYTES:,}); check the path")
        text = file.read_text()
    except FileNotFoundError:
        raise UsageError(f"recipe {file} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read recipe {file}: {error}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            check_expansion(node, file)
        data = yaml.safe_load(text)
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
