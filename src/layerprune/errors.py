"""Errors that reach the user.

Every problem a user can fix by changing their input raises :class:`UsageError`. The CLI turns it
into one line on stderr and exit code 2, without a traceback, so that a bad flag fails in the first
second and says how to fix it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MENTION = re.compile("\x1f([a-z_]+)\x1f")


def mention(name: str) -> str:
    """Option ``name`` named inside a message (``f"raise {mention('samples')}"``): Python shows it by its
    keyword (``samples``), the command line by its flag (``--samples``), see :func:`worded`."""
    return f"\x1f{name}\x1f"


def worded(text: str, label: Callable[[str], str] = str) -> str:
    """``text`` with each option it mentions called ``label(keyword)`` (default: the keyword itself)."""
    return _MENTION.sub(lambda found: label(found.group(1)), text)


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix (other options it names
    through :func:`mention`, so each front-end can call them in its own words)."""

    def __str__(self) -> str:
        return worded(super().__str__())


class OptionError(UsageError):
    """A bad value of one declared option (:mod:`layerprune.options`).

    ``str()`` names the option as Python does, by its keyword (``merge_weight must be ...``), for
    API callers. Each front-end renders it in its own words with :meth:`render`: the command line
    names the flag (``--merge-weight``), a recipe its section key and line (``repair.merge_weight``).
    """

    def __init__(self, name: str, flag: str, problem: str) -> None:
        self.name, self.flag, self.problem = name, flag, problem
        super().__init__(self.render(name))

    @classmethod
    def about(cls, name: str, problem: str) -> OptionError:
        """The error for option ``name`` whose flag is the usual ``--name-with-dashes``; ``problem`` follows
        the option's name and never repeats it (``"must be at least 1, got 0"``)."""
        return cls(name, "--" + name.replace("_", "-"), problem)

    def render(self, label: str) -> str:
        """The message with the option called ``label``."""
        return f"{label} {self.problem}"


class NumericalError(UsageError):
    """Activations became NaN/Inf; the message names the layer and a safer dtype."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (or its type's name): libraries' messages run to
    paragraphs, and a :class:`UsageError` is printed as one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
