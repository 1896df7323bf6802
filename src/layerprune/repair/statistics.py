"""The statistics every training-free repair needs, from ONE pass of the original model.

For each removed run of original layers ``[a, b)`` three signals are read through hooks on the
real submodules (never ``output_hidden_states``, whose last entry is final-normed):

* ``M``: layer ``a-1``'s MLP branch exactly as it is added to the residual (after Gemma's
  post-feedforward norm, times Granite's ``residual_multiplier``), the input of ReplaceMe's map;
* ``h_a``: the input of layer ``a`` (the stream entering the cut);
* ``h_b``: the output of layer ``b-1`` (the stream the layers after the cut were trained on).

Only real tokens count (the attention mask drops padding) and everything is summed in float64,
so the statistics are exact whatever the batch split. Memory is a few H×H matrices per run:
``MᵀM``, ``MᵀY`` with ``Y = h_b - h_a + M``, and the per-channel sums of ``|h_a|``, ``|h_b|``.
Only the cosine solver, which optimises on the tokens themselves, keeps them (``keep_tokens``).
The forward pass stops at the last layer any run needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerprune.errors import UsageError
from layerprune.models.architectures import ArchitectureAdapter

ACCUMULATOR = torch.float64


@dataclass
class RunStatistics:
    """Sums over the real calibration tokens for one removed run ``[start, end)`` (original indices)."""

    start: int
    end: int
    tokens: int = 0
    gram: torch.Tensor | None = None
    """``MᵀM`` (H×H, float64); ``None`` when the method needs no linear map."""
    cross: torch.Tensor | None = None
    """``MᵀY`` with ``Y = h_b - h_a + M`` (H×H, float64)."""
    abs_in: torch.Tensor | None = None
    """Per channel, the sum of ``|h_a|`` over tokens."""
    abs_out: torch.Tensor | None = None
    """Per channel, the sum of ``|h_b|`` over tokens."""
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Per batch, the real tokens' ``(M, h_a - M, h_b)`` in float32 on the CPU (cosine solver only)."""

    def add(self, branch: tuple[torch.Tensor, torch.Tensor] | None, entering: torch.Tensor, leaving: torch.Tensor,
            keep: bool) -> None:
        """Accumulate one batch of real tokens (rows of ``[tokens, H]``); ``branch`` is ``(M, MᵀM)`` of
        the batch (``MᵀM`` in float64, computed once for every run with this start)."""
        entering64, leaving64 = entering.to(ACCUMULATOR), leaving.to(ACCUMULATOR)
        self.tokens += entering.shape[0]
        self.abs_in = _plus(self.abs_in, entering64.abs().sum(dim=0))
        self.abs_out = _plus(self.abs_out, leaving64.abs().sum(dim=0))
        if branch is None:
            return
        output, gram = branch
        output64 = output.to(ACCUMULATOR)
        self.gram = _plus(self.gram, gram)
        self.cross = _plus(self.cross, output64.T @ (leaving64 - entering64 + output64))
        if keep:
            self.kept.append((output.float().cpu(), (entering - output).float().cpu(), leaving.float().cpu()))

    def magnitude_ratio(self) -> float:
        """Prune&Comp's ``s``: the mean over channels of ``mean|h_b| / mean|h_a|``.

        A channel that is zero on every token entering the cut has no ratio and is left out.
        """
        assert self.abs_in is not None and self.abs_out is not None, "no tokens were accumulated"
        live = self.abs_in > 0
        if not live.any():
            raise UsageError(f"the stream entering layer {self.start} is zero on every calibration token; "
                             "rescale cannot measure its magnitude: use other calibration data")
        return float((self.abs_out[live] / self.abs_in[live]).mean())


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


class _Finished(Exception):
    """Raised by the hook of the deepest layer any run needs: the rest of the model is not needed."""


def branch_module(layer: nn.Module, adapter: ArchitectureAdapter) -> nn.Module:
    """The module whose output is the MLP branch as added to the residual (Gemma: its post-norm)."""
    path = adapter.post_mlp_norm or adapter.mlp_output
    try:
        return layer.get_submodule(path)
    except AttributeError:
        raise UsageError(f"{adapter.family} layers have no {path!r} module, the MLP output a training-free repair "
                         "folds into; this family is not supported by replace-linear or merge") from None


def _hidden_argument(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def collect_statistics(model: nn.Module, adapter: ArchitectureAdapter, runs: list[tuple[int, int]],
                       batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, linear: bool,
                       keep_tokens: bool = False) -> list[RunStatistics]:
    """One pass of ``model`` (unpruned: ``runs`` are its layer indices) over ``batches`` of
    ``(input_ids, attention_mask)``; returns one :class:`RunStatistics` per run, in order.

    ``runs`` may be the runs of many different cuts (a search fits every candidate's repair from
    this one pass): they may share a start, an end, or overlap. ``linear`` asks for the ``M``
    statistics of every run that starts after layer 0 (one at layer 0 has no layer before it, and
    only its magnitudes are summed; the methods that need ``M`` refuse such a run beforehand).
    Runs with the same start share one ``MᵀM`` per batch.
    """
    layers = adapter.decoder_layers(model)
    stats = [RunStatistics(start, end) for start, end in runs]
    starts = sorted({start for start, _ in runs})
    branch_starts = {start for start in starts if linear and start > 0}
    captured: dict[tuple[str, int], torch.Tensor] = {}
    real: dict[str, torch.Tensor] = {}
    last_layer = max(end for _, end in runs) - 1

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1, tensor.shape[-1])[real["mask"]]

    # the branch as added to the residual: Granite scales it by residual_multiplier first
    multiplier = float(getattr(model.config.get_text_config(), adapter.branch_multiplier)) \
        if adapter.branch_multiplier else 1.0

    def keep_branch(start: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            branch = rows(output.detach()) * multiplier if multiplier != 1.0 else rows(output.detach())
            branch64 = branch.to(ACCUMULATOR)
            captured["branch", start] = branch
            captured["gram", start] = branch64.T @ branch64
        return hook

    def keep_input(start: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured["entering", start] = rows(_hidden_argument(args, kwargs).detach())
        return hook

    def finish_run(run: RunStatistics):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            branch = (captured["branch", run.start], captured["gram", run.start]) if run.start in branch_starts else None
            run.add(branch, captured["entering", run.start], rows(_hidden_output(output).detach()), keep_tokens)
        return hook

    handles = []
    for start in branch_starts:
        handles.append(branch_module(layers[start - 1], adapter).register_forward_hook(keep_branch(start)))
    for start in starts:
        handles.append(layers[start].register_forward_pre_hook(keep_input(start), with_kwargs=True))
    for run in stats:
        handles.append(layers[run.end - 1].register_forward_hook(finish_run(run)))
    handles.append(layers[last_layer].register_forward_hook(finish_pass))  # last: every run has been summed
    run_until_finished(model, batches, handles, real, captured)
    return stats


def finish_pass(module: nn.Module, args: tuple, output: Any) -> None:
    """A forward hook on the deepest layer a collection reads: registered last, it ends the pass once
    everything is captured, so no batch runs the layers below it."""
    raise _Finished


def run_until_finished(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                       handles: list[Any], real: dict[str, torch.Tensor], captured: dict[Any, Any]) -> None:
    """Run every batch through ``model`` with the collection's ``handles`` registered, ``real["mask"]``
    set to the batch's real (not padding) positions and ``captured`` emptied before each, then remove
    the handles whatever happens."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                real["mask"] = attention_mask.reshape(-1).to(device).bool()
                captured.clear()
                try:
                    model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
                except _Finished:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def stream_position(unit: int) -> str:
    """Where unit position ``p`` of a layer sequence reads the residual stream: ``2i`` enters layer ``i``
    (before its attention), ``2i + 1`` enters its MLP (after its attention)."""
    return f"{'attention' if unit % 2 == 0 else 'MLP'} of layer {unit // 2}"


def collect_unit_statistics(model: nn.Module, adapter: ArchitectureAdapter, runs: list[tuple[int, int]],
                            batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, linear: bool = False,
                            keep_tokens: bool = False) -> list[RunStatistics]:
    """The :class:`RunStatistics` of runs of *branch units* ``[a, b)`` (unit ``2i``: the attention of layer
    ``i``, ``2i + 1``: its MLP; ``2L``: past the last layer), from one pass.

    ``h_a`` is the residual stream entering unit ``a``: a layer's input for an attention, its MLP's
    pre-norm input (the stream after the attention) for an MLP; ``h_b`` likewise at ``b``, and at
    ``2L`` the last layer's output. ``linear`` adds ``MᵀM`` and ``MᵀY`` of every run after unit 0, ``M``
    being the branch before it, unit ``a-1``, as added to the residual: in a sequential layer that is
    exactly ``h_a - h_{a-1}`` (after Gemma's post-branch norm, times Granite's multiplier, whatever the
    family), taken in float64 from the two streams. Runs with the same start share one ``MᵀM`` per
    batch. Sequential-residual families only (in a parallel-residual layer both branches read the
    layer's input: there is no stream between them)."""
    if not adapter.stream_between_branches:
        raise UsageError(f"{adapter.family} layers feed their attention and MLP the same input (parallel residual), "
                         "so there is no residual stream between the two branches to repair at")
    layers = adapter.decoder_layers(model)
    stats = [RunStatistics(start, end) for start, end in runs]
    branch_starts = {start for start, _ in runs if linear and start > 0}
    positions = sorted({p for run in runs for p in run} | {start - 1 for start in branch_starts})
    captured: dict[Any, torch.Tensor] = {}
    real: dict[str, torch.Tensor] = {}
    last_layer = min(max(positions) // 2, len(layers) - 1)

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1, tensor.shape[-1])[real["mask"]]

    def branch_before(start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(M, MᵀM)`` of the run starting at ``start``, computed once per batch (``None`` without ``linear``)."""
        if start not in branch_starts:
            return None
        if ("branch", start) not in captured:
            branch = captured[start].to(ACCUMULATOR) - captured[start - 1].to(ACCUMULATOR)
            captured["branch", start], captured["gram", start] = branch, branch.T @ branch
        return captured["branch", start], captured["gram", start]

    def keep(position: int, read: Any):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured[position] = rows(read(args, kwargs).detach())
            for run in stats:
                if run.end == position:  # the streams the run reads were captured earlier in the pass
                    run.add(branch_before(run.start), captured[run.start], captured[position], keep_tokens)
        return hook

    def first_argument(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else next(iter(kwargs.values()))

    handles = []
    for position in positions:
        index = position // 2
        if position == 2 * len(layers):
            leaving = keep(position, lambda args, _: _hidden_output(args[0]))
            handles.append(layers[-1].register_forward_hook(lambda module, args, output, hook=leaving: hook(
                module, (output,), {})))
        elif position % 2 == 0:
            handles.append(layers[index].register_forward_pre_hook(keep(position, _hidden_argument), with_kwargs=True))
        else:
            norm = layers[index].get_submodule(adapter.pre_mlp_norm)
            handles.append(norm.register_forward_pre_hook(keep(position, first_argument), with_kwargs=True))

    handles.append(layers[last_layer].register_forward_hook(finish_pass))  # last: after every capture
    run_until_finished(model, batches, handles, real, captured)
    return stats
