"""Running calibration data through a model while watching (or replaying) its decoder layers.

Every data-driven metric needs the same few things: the calibration rows in batches, which tokens
count (never padding), the true input and output of each decoder layer (hooks, not
``output_hidden_states``, whose last entry is final-normed in transformers 5), a NaN/Inf check that
names the layer, and the model's own head to turn a hidden state into next-token log-likelihoods.
Hooks also record the exact extra arguments each layer received (causal or sliding-window mask,
rotary position embeddings...), so a layer can be re-run later without knowing how its family
builds them; that is what lets ``ppl`` restart from a cached layer input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from layerprune.data import CalibrationSet
from layerprune.errors import NumericalError, OptionError
from layerprune.models.architectures import ArchitectureAdapter
from layerprune.models.hooks import layer_input, layer_output
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import branch_zeroed

POSITIONS = ("all", "last")


def scored_positions(attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    """Bool mask of the tokens a similarity metric averages over: every real token, or only the
    last real token of each row (wherever the padding is)."""
    real = attention_mask.to(torch.bool)
    if positions == "all":
        return real
    index = torch.arange(real.shape[1], device=real.device).expand_as(real)
    last = torch.where(real, index, -1).amax(dim=1)
    return (index == last[:, None]) & real


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(where, targets)``: the positions ``[rows, seq_len-1]`` whose next token is a real token
    to predict (both real), and those next tokens."""
    real = attention_mask.to(torch.bool)
    where = real[:, :-1] & real[:, 1:]
    return where, input_ids[:, 1:][where]


def count_targets(calibration: CalibrationSet, metric: str) -> int:
    """Next-token targets in the whole set (the loss is their mean); refuses a set without any."""
    total = int(next_token_targets(calibration.input_ids, calibration.attention_mask)[0].sum())
    if total == 0:
        raise OptionError.about("seq_len", f"leaves {metric} rows without two real tokens; raise it or use other "
                                           "data")
    return total


def lm_batches(calibration: CalibrationSet, batch_size: int, label: str
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask, where, targets)`` per batch, skipping batches with no target."""
    for batch in calibration.batches(batch_size, label):
        where, targets = next_token_targets(batch["input_ids"], batch["attention_mask"])
        if bool(where.any()):
            yield batch["input_ids"], batch["attention_mask"], where, targets


def check_finite(layer: int, x_out: torch.Tensor, real: torch.Tensor) -> None:
    """Raise :class:`NumericalError` if a real token's output of ``layer`` is NaN or Inf."""
    bad = ~torch.isfinite(x_out).all(dim=-1) & real.to(torch.bool).to(x_out.device)
    if bool(bad.any()):
        raise NumericalError(
            f"decoder layer {layer} produced NaN/Inf activations in {str(x_out.dtype).removeprefix('torch.')}; "
            "load the model with --dtype float32 (or bfloat16, which has float32's range) and score again"
        )


def replay_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """Run ``layer`` on ``hidden`` with the other arguments it received in a recorded pass."""
    if "hidden_states" in kwargs:
        return layer_output(layer(*args, **{**kwargs, "hidden_states": hidden}))
    return layer_output(layer(hidden, *args, **kwargs))


LayerCallback = Callable[[int, torch.Tensor, torch.Tensor, tuple[Any, ...], dict[str, Any]], None]


@contextmanager
def watching_layers(layers: nn.ModuleList, callback: LayerCallback) -> Iterator[None]:
    """Call ``callback(index, x_in, x_out, args, kwargs)`` after every decoder layer runs."""

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            callback(index, layer_input(args, kwargs), layer_output(output), args, kwargs)

        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


LayerCall = tuple[tuple[Any, ...], dict[str, Any]]
"""The extra arguments one decoder layer received (masks, rotary embeddings...), as :func:`replay_layer` takes them."""


class RecordedPass(NamedTuple):
    """One batch through the whole model: each layer's input and extra arguments, and the decoder's
    (final-normed) output, so any suffix of the stack can be re-run from a layer boundary."""

    inputs: list[torch.Tensor]
    calls: list[LayerCall]
    final: torch.Tensor


def record_pass(loaded: LoadedModel, layers: nn.ModuleList, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> RecordedPass:
    """Run ``input_ids`` through ``loaded`` (checking every layer's output is finite), keeping what
    :func:`replay_from` needs to restart at any layer: a cut that keeps layers ``0..i-1`` shares their
    output with the original, so its forward can start at layer ``i``."""
    inputs: list[torch.Tensor] = []
    calls: list[LayerCall] = []

    def record(index: int, x_in: torch.Tensor, x_out: torch.Tensor, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> None:
        check_finite(index, x_out, attention_mask)
        inputs.append(x_in)
        calls.append((args[1:], kwargs))

    with watching_layers(layers, record):
        final = run_decoder(loaded, input_ids, attention_mask)
    return RecordedPass(inputs, calls, final)


def replay_from(layers: nn.ModuleList, recorded: RecordedPass, start: int, skip: frozenset[int] = frozenset(),
                zeroed: Mapping[int, str] | None = None, adapter: ArchitectureAdapter | None = None) -> torch.Tensor:
    """The output of the last layer (before the final norm) when the stack restarts at layer ``start``
    from its recorded input and runs every later layer not in ``skip``; a layer in ``zeroed`` runs with
    that branch (``attention`` or ``mlp``) adding nothing (:func:`branch_zeroed`, which needs the
    family's ``adapter``), which is what a model with that branch removed computes there."""
    hidden = recorded.inputs[start]
    zeroed = zeroed or {}
    assert adapter is not None or not zeroed, "a zeroed branch is found through the family's adapter"
    for index in range(start, len(layers)):
        if index in skip:
            continue
        with branch_zeroed(layers[index], adapter, zeroed[index]) if index in zeroed else nullcontext():
            hidden = replay_layer(layers[index], hidden, *recorded.calls[index])
    return hidden


def run_decoder(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run the decoder stack (no LM head: scoring needs layer states, not logits)."""
    device = loaded.model.device
    output = loaded.model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     use_cache=False)
    return output.last_hidden_state


class Head:
    """The model's own path from a decoder-layer output to next-token logits.

    It calls the model's own modules that its family file declares between the last layer and the
    logits (final norm, a head projection such as OPT's ``project_out``, the LM head), then the
    family's declared logit steps (Gemma's soft-capping, Cohere's ``logit_scale``, Granite's
    ``logits_scaling``). tests/scoring/test_head.py proves it equals ``model(...).logits`` for
    every family's tiny model.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        model, adapter = loaded.model, loaded.adapter
        self.before_head = [model.get_submodule(path) for path in adapter.pre_head_paths(model)]
        self.lm_head = model.get_submodule(adapter.lm_head)
        self.config = model.config
        self.adapter = adapter

    def logits(self, hidden: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """Logits for ``hidden`` (any leading shape); ``normed`` if the final norm (and head
        projection) already ran, as in the base model's ``last_hidden_state`` (:func:`run_decoder`)."""
        if not normed:
            for module in self.before_head:
                hidden = module(hidden)
        return self.adapter.scale_logits(self.lm_head(hidden), self.config)

    def nll_sum(self, hidden: torch.Tensor, where: torch.Tensor, targets: torch.Tensor, *,
                normed: bool = False) -> torch.Tensor:
        """Summed next-token NLL (log-softmax in float32 or better) over the positions ``where`` of ``hidden``
        ``[rows, seq_len, h]``; the head runs only on those positions, which is exact because the
        norm and head act token by token."""
        chosen = hidden[:, :-1][where.to(hidden.device)]
        logits = self.logits(chosen, normed=normed)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="sum")


class LossSetup(NamedTuple):
    """What the loss-based metrics (``ppl``, ``taylor``) start from: the calibration rows, their
    next-token target count (each loss is the mean over them), the decoder layers and the head."""

    calibration: CalibrationSet
    total: int
    layers: nn.ModuleList
    head: Head


def loss_setup(loaded: LoadedModel, calibration: CalibrationSet, metric: str) -> LossSetup:
    """The :class:`LossSetup` of ``loaded`` on ``calibration``; refuses rows with nothing to predict."""
    return LossSetup(calibration, count_targets(calibration, metric), loaded.adapter.decoder_layers(loaded.model),
                     Head(loaded))
