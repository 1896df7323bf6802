"""The command line as data, so ``--help``, ``--version`` and a mistyped flag are answered at once.

The real parser is built from the typed configs of every stage, whose modules import torch and
transformers: seconds of CPU before argparse reads a single flag. ``commands.json`` (written by
``python docs/gen_api.py`` from that parser; a test checks it is current) holds every command's
flags with their help, defaults, choices and the checks argparse makes of them, and
:func:`quick_parser` rebuilds the parser from it with nothing heavier than argparse. ``layerprune``
reads its arguments with the quick parser first: help, the version and what argparse refuses (an
unknown flag, a missing value, a bad integer or choice) end there, in the same words the real
parser would use. A flag whose value only the real parser can check (its own type function, such
as ``--dtype``) passes the quick parser as text and is checked by the real one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPEC_FILE = Path(__file__).with_name("commands.json")

# argparse's action classes by a stable name (what the spec stores), and back
_KINDS: dict[type[argparse.Action], str] = {
    argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const",
    argparse._AppendAction: "append", argparse._CountAction: "count", argparse._VersionAction: "version",
    argparse.BooleanOptionalAction: "boolean_optional",
}
_ACTIONS = {name: action for action, name in _KINDS.items()}
_EXACT_TYPES = {"int": int, "float": float, "str": str}


class DefaultsShownFormatter(argparse.HelpFormatter):
    """Show every option's default in ``--help`` without repeating one the help text already states.

    argparse's own ArgumentDefaultsHelpFormatter also prints "(default: None)" and "(default: False)",
    which say nothing, and doubles the defaults that help texts spell out in words ("per method").
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        says_nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if (not action.option_strings or "default" in text or says_nothing
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return action.help
        return f"{text} (default: %(default)s)"


def _type_name(action: argparse.Action) -> str | None:
    """``int``, ``float`` or ``str`` where argparse converts with that builtin (the quick parser checks
    it alike); ``None`` for a type function of layerprune's own, which the real parser checks."""
    if action.type is None:
        return "str"
    return action.type.__name__ if action.type in _EXACT_TYPES.values() else None


def _default(action: argparse.Action) -> Any:
    """What ``--help`` shows of the default: ``None``/``False`` as themselves (they show nothing), an
    ``append`` flag's list as a list (it appends to it), any other value as the text argparse prints."""
    if action.default is None or isinstance(action.default, bool):
        return action.default
    if isinstance(action, argparse._AppendAction) and isinstance(action.default, list):
        return [str(item) for item in action.default]
    return str(action.default)


def _describe_action(action: argparse.Action) -> dict[str, Any]:
    kind = _KINDS[type(action)]
    checked = _type_name(action)
    strings, text = action.option_strings, action.help
    if kind == "boolean_optional":  # argparse adds the --no- twin (and, before Python 3.12, the default) itself
        strings = [s for s in strings if not s.startswith("--no-")]
        text = (text or "").removesuffix(" (default: %(default)s)") or None
    entry: dict[str, Any] = {"kind": kind, "option_strings": strings, "dest": action.dest,
                             "help": text, "default": _default(action), "required": action.required}
    if kind in ("store", "append"):
        entry.update(nargs=action.nargs, type=checked, metavar=action.metavar)
        if action.choices is not None:
            choices = list(action.choices)
            if checked is None:  # compared after the own type converts: shown, but checked by the real parser
                entry["metavar"] = action.metavar or "{" + ",".join(map(str, choices)) + "}"
            else:
                entry["choices"] = choices
    if kind == "store_const":
        entry["const"] = action.const
    if kind == "version":
        entry["version"] = action.version
    return entry


def describe(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``parser`` (and its subcommands) as data: what :func:`quick_parser` needs to rebuild it."""
    groups = [group for group in parser._action_groups if group not in parser._action_groups[:2]]
    exclusive = [{"dests": [a.dest for a in group._group_actions], "required": group.required}
                 for group in parser._mutually_exclusive_groups]
    grouped = {id(a): index for index, group in enumerate(groups) for a in group._group_actions}
    document: dict[str, Any] = {
        "prog": parser.prog, "description": parser.description, "epilog": parser.epilog,
        "groups": [{"title": g.title, "description": g.description} for g in groups],
        "exclusive": exclusive, "actions": [], "commands": [],
    }
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            document["subcommand_dest"] = action.dest
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            document["commands"] = [{"name": name, "help": helps[name], **describe(sub)}
                                    for name, sub in action.choices.items()]
            continue
        document["actions"].append({**_describe_action(action), "group": grouped.get(id(action))})
    return document


def write_spec(parser: argparse.ArgumentParser, path: Path = SPEC_FILE) -> Path:
    path.write_text(spec_text(parser))
    return path


def spec_text(parser: argparse.ArgumentParser) -> str:
    return json.dumps(describe(parser), indent=1, sort_keys=True) + "\n"


def _add_action(container: Any, entry: dict[str, Any]) -> None:
    default = entry["default"]
    if default == argparse.SUPPRESS:
        default = argparse.SUPPRESS  # argparse tests its identity
    elif isinstance(default, list):
        default = list(default)  # appended to: a parser of its own
    keywords: dict[str, Any] = {"dest": entry["dest"], "help": entry["help"], "default": default,
                                "action": _ACTIONS[entry["kind"]]}
    if entry["option_strings"]:
        keywords["required"] = entry["required"]
    else:
        del keywords["dest"]  # a positional's dest is its name
    if entry["kind"] in ("store", "append"):
        keywords.update(nargs=entry["nargs"], metavar=entry["metavar"], choices=entry.get("choices"),
                        type=_EXACT_TYPES.get(entry["type"] or "str"))
    if entry["kind"] == "store_const":
        keywords["const"] = entry["const"]
    if entry["kind"] == "version":
        keywords = {"action": "version", "version": entry["version"], "help": entry["help"]}
    container.add_argument(*(entry["option_strings"] or [entry["dest"]]), **keywords)


def _build(parser: argparse.ArgumentParser, document: dict[str, Any], parser_class: type) -> None:
    groups = [parser.add_argument_group(g["title"], g["description"]) for g in document["groups"]]
    containers: dict[str, Any] = {}
    for exclusive in document["exclusive"]:
        first = next(a for a in document["actions"] if a["dest"] in exclusive["dests"])
        home = parser if first["group"] is None else groups[first["group"]]
        group = home.add_mutually_exclusive_group(required=exclusive["required"])
        containers.update(dict.fromkeys(exclusive["dests"], group))
    for entry in document["actions"]:
        home = parser if entry["group"] is None else groups[entry["group"]]
        _add_action(containers.get(entry["dest"], home), entry)
    if document["commands"]:
        subparsers = parser.add_subparsers(dest=document["subcommand_dest"], required=True, parser_class=parser_class)
        for command in document["commands"]:
            sub = subparsers.add_parser(command["name"], help=command["help"], description=command["description"],
                                        epilog=command["epilog"])
            _build(sub, command, parser_class)


def quick_parser(parser_class: type[argparse.ArgumentParser], path: Path = SPEC_FILE) -> argparse.ArgumentParser | None:
    """The command line rebuilt from its spec; ``None`` where none ships or it cannot be read (the real
    parser then answers, only slower)."""
    try:
        document = json.loads(path.read_text())
        parser = parser_class(prog=document["prog"], description=document["description"], epilog=document["epilog"])
        _build(parser, document, parser_class)
    except (OSError, ValueError, KeyError, TypeError, argparse.ArgumentError):
        return None
    return parser
