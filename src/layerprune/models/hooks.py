"""Watching a submodule's input and output during a forward pass, and stopping the pass early.

Scoring, layer streaming and replacement healing all need what a decoder layer received and what it
returned, and often nothing after it: the rest of the model would be wasted work (or, for a
skeleton on the ``meta`` device, impossible). Decoder layers take their hidden state positionally
in some families and as ``hidden_states=`` in others, and return a tensor or a tuple whose first
entry is the hidden state; :func:`layer_input` and :func:`layer_output` absorb both, so no caller
knows which family it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden state a decoder layer was called with, positional or keyword."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output: Any) -> torch.Tensor:
    """The hidden state a decoder layer returned, bare or first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


class StopForward(Exception):
    """Raised by a hook once everything wanted is captured; :func:`until_stopped` swallows it."""


@contextmanager
def until_stopped() -> Iterator[None]:
    """Run a forward pass that a hook may end early by raising :class:`StopForward`."""
    try:
        yield
    except StopForward:
        pass


@dataclass
class Captured:
    """What :func:`capture_io` recorded: the first module's hidden-state input and keyword
    arguments (masks, rotary embeddings, positions), and the last module's hidden-state output."""

    input: torch.Tensor | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: torch.Tensor | None = None


@contextmanager
def capture_io(input_of: nn.Module, output_of: nn.Module, *, stop: bool = True) -> Iterator[Captured]:
    """Record ``input_of``'s input and ``output_of``'s output during the forward run in the block.

    With ``stop``, the pass ends as soon as ``output_of`` has run (the rest of the model is not
    needed), and the block carries on after the forward call as if it had returned.
    """
    captured = Captured()

    def take_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.input = layer_input(args, kwargs)
        captured.kwargs = dict(kwargs)

    def take_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured.output = layer_output(output)
        if stop:
            raise StopForward

    handles = [input_of.register_forward_pre_hook(take_input, with_kwargs=True),
               output_of.register_forward_hook(take_output)]
    try:
        with until_stopped():
            yield captured
    finally:
        for handle in handles:
            handle.remove()
