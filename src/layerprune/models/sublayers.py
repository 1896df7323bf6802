"""Sub-layer surgery: remove a layer's attention or its MLP and keep the other.

A decoder layer is two branches on the residual stream. Removing one replaces its modules by a
parameter-free stand-in that adds nothing to the stream (:class:`RemovedAttention`,
:class:`RemovedMLP`), so the layer keeps its other branch and computes exactly what the original
computes with the removed branch's output zeroed. A layer with neither branch left is removed whole
(:func:`~layerprune.models.surgery.remove_layers`). A layer without attention holds no keys or values
in the KV cache: its slot only counts tokens (:class:`TokenCount`), which the model's position and
mask code read from the cache's first layer, so greedy generation with the cache equals generation
without it.

Checkpoints cannot hold a parameter-free branch, so the export (:func:`repack`) packs the kept
branches into standard layers, each attention with the next kept MLP after it, and gives a branch
with no partner a partner whose weights are zero (:func:`zero_partner`); a layerprune reload turns
those back into removed branches (:func:`restore_removed_branches`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from layerprune.errors import UsageError
from layerprune.models.architectures import ArchitectureAdapter
from layerprune.models.surgery import check_index_list, rebuild_layers, remove_layers

ATTENTION, MLP = "attention", "mlp"
KINDS = (ATTENTION, MLP)
UNIT_PREFIX = {ATTENTION: "attn", MLP: "mlp"}
"""A branch as a scoring unit is named ``attn.i`` or ``mlp.i`` (``i``: its layer, as scored)."""
_UNIT = re.compile(r"^(attn|mlp)\.(\d+)$")
Branches = list[dict[str, int | None]]
"""Per layer, the original index of the layer whose attention and whose MLP it holds (None: removed)."""


class TokenCount(DynamicLayer):
    """The KV-cache slot of a layer whose attention was removed: it stores no keys or values, only how
    many tokens have passed, which is what the model asks of a cache layer for positions and masks."""

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True
        self.tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the slot holds no tensors."""

    def count(self, tokens: int) -> None:
        self.tokens += tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.count(key_states.shape[-2])
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        self.tokens = max(self.tokens - tokens_to_remove, 0)

    def reset(self) -> None:
        self.tokens = 0

    def offload(self) -> None:
        """No tensors to move."""

    def prefetch(self) -> None:
        """No tensors to move."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """No tensors to reorder."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        """No tensors to repeat."""

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """No tensors to select from."""


_CACHE_KEYWORDS = ("cache", "layer_past", "past_key_values")  # transformers 5, GPT-NeoX, older releases


class RemovedAttention(nn.Module):
    """A removed attention branch: adds zero to the residual stream and keeps no keys or values.

    It takes whatever the layer passes its attention (hidden state positional or by keyword) and
    returns what every attention returns, ``(output, weights)``. ``layer_idx`` is renumbered by the
    surgery like an attention's, so the cache slot it counts tokens in is its layer's."""

    def __init__(self, layer_idx: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = next((kwargs[name] for name in _CACHE_KEYWORDS if kwargs.get(name) is not None), None)
        if cache is not None and self.layer_idx is not None:
            _token_count(cache, self.layer_idx).count(hidden.shape[-2])
        return hidden.new_zeros(hidden.shape), None


def _token_count(cache: Any, index: int) -> TokenCount:
    """The token-counting slot of layer ``index`` in ``cache``, put in place of an empty one."""
    layers = cache.layers
    while len(layers) <= index:  # a lazily grown cache has no slot for the later layers yet
        layers.append(cache.layer_class_to_replicate())
    if not isinstance(layers[index], TokenCount):
        layers[index] = TokenCount()
    return layers[index]


class RemovedMLP(nn.Module):
    """A removed MLP branch: adds zero to the residual stream."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden.new_zeros(hidden.shape)


class RemovedProjection(nn.Module):
    """One projection of a removed MLP that is no module of its own (OPT's ``fc1``/``fc2``): zeros of
    ``width`` features (0 for an input projection, so the activation between them costs nothing)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], self.width)


REMOVED = (RemovedAttention, RemovedMLP, RemovedProjection)


def has_branch(layer: nn.Module, adapter: ArchitectureAdapter, kind: str) -> bool:
    """Whether ``layer`` still computes its ``kind`` branch."""
    return not isinstance(layer.get_submodule(adapter.branch_modules(kind)[-1]), REMOVED)


def present_branches(model: nn.Module, adapter: ArchitectureAdapter) -> list[tuple[bool, bool]]:
    """For each decoder layer, whether its attention and its MLP are there."""
    return [(has_branch(layer, adapter, ATTENTION), has_branch(layer, adapter, MLP))
            for layer in adapter.decoder_layers(model)]


def unit_name(kind: str, layer: int) -> str:
    """``attn.3`` for the attention of layer 3, ``mlp.3`` for its MLP."""
    return f"{UNIT_PREFIX[kind]}.{layer}"


def parse_unit(name: str) -> tuple[str, int]:
    """``(kind, layer)`` of a unit name such as ``attn.3``."""
    match = _UNIT.match(name)
    if match is None:
        raise UsageError(f"{name!r} names no branch; write attn.N or mlp.N")
    return (ATTENTION if match.group(1) == "attn" else MLP), int(match.group(2))


def split_units(units: Iterable[Hashable]) -> tuple[frozenset[int], dict[int, str]]:
    """A cut given as units (a layer's index, or a branch ``attn.i`` / ``mlp.i``) as the surgery makes
    it: the layers that go whole (named, or both of their branches named: a layer with neither adds
    nothing, so it is removed) and the layers that lose one branch, with its kind."""
    whole = {unit for unit in units if isinstance(unit, int)}
    branches: dict[int, set[str]] = {}
    for unit in units:
        if not isinstance(unit, int):
            kind, layer = parse_unit(str(unit))
            branches.setdefault(layer, set()).add(kind)
    whole |= {layer for layer, kinds in branches.items() if len(kinds) == len(KINDS)}
    return frozenset(whole), {layer: next(iter(kinds)) for layer, kinds in sorted(branches.items())
                              if layer not in whole}


def branch_units(model: nn.Module, adapter: ArchitectureAdapter) -> list[tuple[str, int]]:
    """The branches ``model`` still computes, as ``(kind, layer)`` in the order the residual stream
    meets them: the units a sub-layer score ranks."""
    return [(kind, index) for index, present in enumerate(present_branches(model, adapter))
            for kind, there in zip(KINDS, present, strict=True) if there]


def branch_parameters(layer: nn.Module, adapter: ArchitectureAdapter, kind: str) -> int:
    """The parameters that go with ``layer``'s ``kind`` branch: its modules and its norms (each
    tensor once), which is what removing the branch takes out of the model."""
    paths = (*adapter.branch_modules(kind), *adapter.branch_norms(kind))
    tensors = {id(p): p.numel() for path in paths for p in layer.get_submodule(path).parameters()}
    return sum(tensors.values())


@contextmanager
def branch_zeroed(layer: nn.Module, adapter: ArchitectureAdapter, kind: str) -> Iterator[None]:
    """While open, ``layer``'s ``kind`` branch adds nothing to the residual stream: its module's
    output is zero (an attention's first output, its weights untouched), which is what removing it
    computes, without changing the model's structure (removal perplexity per branch)."""

    def zero(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handle = layer.get_submodule(adapter.branch_modules(kind)[-1]).register_forward_hook(zero)
    try:
        yield
    finally:
        handle.remove()


def kv_bytes_per_layer(config: Any, dtype: torch.dtype) -> int:
    """The KV cache one attention layer holds per token: keys and values of every KV head, in ``dtype``
    (a sliding-window layer's too: per token it is the same until the window fills)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim * dtype.itemsize


def check_sublayers(adapter: ArchitectureAdapter) -> None:
    """Refuse a family whose branches cannot be removed apart, saying why and what to do instead."""
    reason = adapter.sublayer_refusal()
    if reason is not None:
        raise UsageError(f"{reason}, so its attention and MLP cannot be removed apart; remove whole layers instead")


def remove_branch(layer: nn.Module, adapter: ArchitectureAdapter, kind: str) -> None:
    """Replace ``layer``'s ``kind`` branch by its parameter-free stand-in."""
    paths = adapter.branch_modules(kind)
    if kind == ATTENTION:
        attention = layer.get_submodule(paths[0])
        layer.set_submodule(paths[0], RemovedAttention(getattr(attention, "layer_idx", None)))
    elif len(paths) == 1:
        layer.set_submodule(paths[0], RemovedMLP())
    else:  # projections in the layer itself: the inputs give nothing, the output zeros of its width
        *inputs, output = paths
        for path in inputs:
            layer.set_submodule(path, RemovedProjection(0))
        layer.set_submodule(output, RemovedProjection(layer.get_submodule(output).out_features))


def plan_branch_removal(present: Sequence[tuple[bool, bool]], layers: Sequence[int], attention: Sequence[int],
                        mlp: Sequence[int]) -> list[int]:
    """Check a cut of whole ``layers`` and single branches (current indices) of a model whose layers
    hold ``present`` branches; returns the layers that go whole (named, or left with no branch).

    Refused: an index out of range or named twice, a layer named whole and by branch, a branch
    already removed, and a cut that leaves no branch at all."""
    count = len(present)
    named = {"layers": check_index_list(layers, count, "layer"),
             ATTENTION: check_index_list(attention, count, "attention"), MLP: check_index_list(mlp, count, "MLP")}
    if not any(named.values()):
        raise UsageError("nothing to remove; name at least one layer, attention or MLP")
    for kind in KINDS:
        both = sorted(set(named["layers"]) & set(named[kind]))
        if both:
            raise UsageError(f"layers {both} are removed whole and their {kind} named as well; name each layer once")
        gone = [i for i in named[kind] if not present[i][KINDS.index(kind)]]
        if gone:
            raise UsageError(f"the {kind} of layers {gone} is already removed; name branches the model still has")
    def kept(index: int) -> tuple[bool, bool]:
        has_attention, has_mlp = present[index]
        return has_attention and index not in named[ATTENTION], has_mlp and index not in named[MLP]

    if not any(any(kept(i)) for i in range(count) if i not in named["layers"]):
        raise UsageError("this cut removes every attention and MLP of the model; keep at least one branch")
    return sorted({*named["layers"], *(i for i in {*named[ATTENTION], *named[MLP]} if not any(kept(i)))})


def remove_branches(model: nn.Module, adapter: ArchitectureAdapter, layers: Sequence[int], attention: Sequence[int],
                    mlp: Sequence[int]) -> list[int]:
    """Remove whole ``layers`` and the named branches (current indices) in place; returns the layers
    that went whole, sorted. A layer left with no branch goes whole, so it costs nothing."""
    if attention or mlp:
        check_sublayers(adapter)
    whole = plan_branch_removal(present_branches(model, adapter), layers, attention, mlp)
    current = adapter.decoder_layers(model)
    for kind, named in ((ATTENTION, attention), (MLP, mlp)):
        for index in named:
            if index not in whole:
                remove_branch(current[index], adapter, kind)
    if whole:
        remove_layers(model, whole, adapter)
    return whole


def repack_plan(present: Sequence[tuple[bool, bool]], parallel: bool) -> list[tuple[int | None, int | None]]:
    """Which current layers' attention and MLP each layer of the standard (exported) form holds.

    Walking the kept branches in order, a layer takes the next attention and the next MLP after it;
    a branch with no partner gets none (the export gives it a zero one). A parallel-residual layer
    feeds both branches the same input, so there each layer keeps its own branches."""
    if parallel:
        return [(i if attention else None, i if mlp else None) for i, (attention, mlp) in enumerate(present)]
    plan: list[tuple[int | None, int | None]] = []
    for index, (attention, mlp) in enumerate(present):
        if attention:
            plan.append((index, index if mlp else None))
        elif mlp and plan and plan[-1][1] is None and plan[-1][0] is not None:
            plan[-1] = (plan[-1][0], index)  # the MLP after an attention whose own MLP is gone
        elif mlp:
            plan.append((None, index))
    return plan


def zero_partner(model: nn.Module, adapter: ArchitectureAdapter, kind: str) -> dict[str, nn.Module]:
    """Modules of a ``kind`` branch that add exactly zero: a kept branch's modules, copied, with every
    weight zero (a zero output projection alone would do; zero weights all round say what it is)."""
    for layer in adapter.decoder_layers(model):
        if has_branch(layer, adapter, kind):
            modules = {path: copy.deepcopy(layer.get_submodule(path)) for path in adapter.branch_modules(kind)}
            with torch.no_grad():
                for module in modules.values():
                    for parameter in module.parameters():
                        parameter.zero_()
            return modules
    raise UsageError(f"the model keeps no {kind} to shape a zero partner on, so the transformers form cannot hold "
                     "it; export with format decilm")


def repack(model: nn.Module, adapter: ArchitectureAdapter, branches: Branches) -> tuple[Branches, int]:
    """Turn ``model`` (a copy: its layers are rebuilt in place) into standard layers that compute the same,
    each with an attention and an MLP (:func:`repack_plan`); returns the new layers' branch origins
    (``branches`` holds the current layers') and the number of zero partners given."""
    present = present_branches(model, adapter)
    plan = repack_plan(present, adapter.parallel_residual)
    current = adapter.decoder_layers(model)
    partners = {kind: zero_partner(model, adapter, kind) for kind in KINDS if not all(p[KINDS.index(kind)] for p in present)}
    layers, sources, origins, zeros = [], [], [], 0
    for attention, mlp in plan:
        host = current[attention if attention is not None else mlp]
        for kind, source in ((ATTENTION, attention), (MLP, mlp)):
            if source is None:
                zeros += 1
                for path, module in partners[kind].items():
                    host.set_submodule(path, copy.deepcopy(module))
            elif current[source] is not host:
                for path in (*adapter.branch_modules(kind), *adapter.branch_norms(kind)):
                    host.set_submodule(path, current[source].get_submodule(path))
        layers.append(host)
        sources.append(attention if attention is not None else mlp)
        origins.append({ATTENTION: None if attention is None else branches[attention][ATTENTION],
                        MLP: None if mlp is None else branches[mlp][MLP]})
    rebuild_layers(model, layers, sources, adapter)  # type: ignore[arg-type]
    return origins, zeros


def restore_removed_branches(model: nn.Module, adapter: ArchitectureAdapter, branches: Branches) -> None:
    """Turn the zero partners of an exported checkpoint (its ``layerprune.json`` says which) back into
    removed branches, after checking that their weights are zero (or the file does not describe them)."""
    layers = adapter.decoder_layers(model)
    if len(branches) != len(layers):
        raise UsageError(f"layerprune.json describes the branches of {len(branches)} layers but the model has "
                         f"{len(layers)}; the checkpoint was changed after layerprune wrote it: delete or fix the record")
    for index, (layer, origin) in enumerate(zip(layers, branches)):
        for kind in KINDS:
            if origin[kind] is not None or not has_branch(layer, adapter, kind):
                continue
            weights = [p for path in adapter.branch_modules(kind) for p in layer.get_submodule(path).parameters()]
            if any(bool(p.any()) for p in weights):
                raise UsageError(f"layerprune.json says the {kind} of layer {index} was removed but its weights are "
                                 "not zero; the checkpoint was changed after layerprune wrote it: delete or fix the record")
            remove_branch(layer, adapter, kind)
