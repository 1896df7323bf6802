"""Errors that reach the user.

Every problem a user can fix by changing their input raises :class:`UsageError`. The CLI turns it
into one line on stderr and exit code 2, without a traceback, so that a bad flag fails in the first
second and says how to fix it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class NumericalError(UsageError):
    """Activations became NaN/Inf; the message names the layer and a safer dtype."""
