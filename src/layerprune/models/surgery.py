"""Layer surgery: remove decoder layers or replace a run of them by one module.

After surgery the model is an ordinary transformers model of its own class: the layer list is
shorter, every per-layer index used by the KV cache (``layer_idx``) is renumbered, and
``config.num_hidden_layers`` plus every per-layer config list (Gemma-3's ``layer_types``) is cut
to match, so ``generate`` with a cache, ``save_pretrained`` and a plain reload all just work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from layerprune.errors import UsageError
from layerprune.models.architectures import ArchitectureAdapter, adapter_for


def validate_layer_indices(indices: Iterable[int], num_layers: int | None = None) -> list[int]:
    """Return ``indices`` sorted, or raise a UsageError naming what is wrong with them.

    Without ``num_layers`` only the checks that need no model run (empty, negative, repeated),
    so a command line can be refused before the model is loaded.
    """
    chosen = list(indices)
    if not chosen:
        raise UsageError("no layers to remove; name at least one layer index")
    check_index_list(chosen, num_layers, "layer")
    if num_layers is not None and len(chosen) >= num_layers:
        raise UsageError(f"cannot remove all {num_layers} layers; keep at least one")
    return sorted(chosen)


def check_index_list(indices: Iterable[int], num_layers: int | None, what: str) -> list[int]:
    """``indices`` of ``what`` (layer, attention, MLP) sorted, refused where one is negative, out of
    range (with ``num_layers``) or repeated; an empty list passes (the caller knows if it may be)."""
    chosen = list(indices)
    negative = [i for i in chosen if i < 0]
    if negative:
        numbered = f"0..{num_layers - 1}" if num_layers is not None else "from 0"
        raise UsageError(f"{what} indices must be >= 0, got {negative}; layers are numbered {numbered}")
    out_of_range = [i for i in chosen if num_layers is not None and i >= num_layers]
    if out_of_range:
        raise UsageError(
            f"{what} indices {out_of_range} are out of range: the model has {num_layers} layers (0..{num_layers - 1})"
        )
    duplicates = sorted({i for i in chosen if chosen.count(i) > 1})
    if duplicates:
        raise UsageError(f"{what} indices {duplicates} are given more than once; name each once")
    return sorted(chosen)


_LAYER_PART = re.compile(r"(-?[0-9]+)(?:-([0-9]+))?", re.ASCII)


MAX_LAYER_INDEX = 100_000
"""No model has this many decoder layers (the largest have a few hundred): a bound for parsing ranges."""


def parse_layer_list(text: str) -> list[int]:
    """Parse ``"3,5,10-12"`` into ``[3, 5, 10, 11, 12]`` (ranges inclusive).

    Only what the help shows is read: ASCII integers and ranges, separated by commas (spaces
    around them allowed). ``int()`` alone would also take ``+3``, other scripts' digits and, with
    empty parts skipped, ``1,,2`` or a trailing comma: each likely a typo that would cut layers the
    user did not mean, so each is refused. A text with no index at all gives ``[]`` (the caller says
    there is nothing to remove); negative indices are read here and refused, with their own message,
    by :func:`validate_layer_indices`.
    """
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        return []  # nothing named at all: the caller says there is nothing to remove
    indices: list[int] = []
    for part in parts:
        match = _LAYER_PART.fullmatch(part)
        if match is None:
            what = "an empty entry" if not part else f"layer index {part!r}"
            raise UsageError(f"cannot read {what} in {text!r}; use integers like 3,5,10-12")
        start, end = match.groups()
        if end is None:
            indices.append(int(start))
            continue
        first, last = int(start), int(end)
        if last < first:
            raise UsageError(f"layer range {part!r} runs backwards; write it as {last}-{first}")
        if last >= MAX_LAYER_INDEX:  # refused before the range is spelled out (0-99999999999 is 10^11 numbers)
            raise UsageError(f"layer range {part!r} reaches past {MAX_LAYER_INDEX:,} layers, more than any model has; "
                             "name the model's layers")
        indices.extend(range(first, last + 1))
    return indices


def cut_layer_config(
    config: PretrainedConfig, adapter: ArchitectureAdapter, source_indices: Sequence[int], old_count: int
) -> None:
    """Set ``num_hidden_layers`` and every per-layer config list for the new stack, whose layer
    ``i`` inherits the entries of current layer ``source_indices[i]``. Shard surgery, which has
    only the config, shares this with in-memory surgery so both write the same config."""
    for name in adapter.per_layer_config:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            setattr(config, name, [values[i] for i in source_indices])
    config.num_hidden_layers = len(source_indices)


def rebuild_layers(
    model: PreTrainedModel,
    layers: Sequence[nn.Module],
    source_indices: Sequence[int],
    adapter: ArchitectureAdapter | None = None,
) -> None:
    """Install ``layers`` as the model's decoder stack.

    ``source_indices[i]`` is the current index whose per-layer config entries (attention type,
    etc.) new layer ``i`` inherits.
    """
    adapter = adapter or adapter_for(model)
    config = model.config
    adapter.check_surgery_allowed(config)
    cut_layer_config(config, adapter, source_indices, adapter.num_layers(model))
    adapter.set_decoder_layers(model, nn.ModuleList(layers))
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    if adapter.sliding_flag and isinstance(getattr(config, "layer_types", None), list):
        base = model.get_submodule(adapter.layers.rpartition(".")[0])
        setattr(base, adapter.sliding_flag, "sliding_attention" in config.layer_types)


def remove_layers(model: PreTrainedModel, indices: Iterable[int], adapter: ArchitectureAdapter | None = None) -> list[int]:
    """Remove the decoder layers at ``indices`` in place; returns them sorted."""
    adapter = adapter or adapter_for(model)
    current = adapter.decoder_layers(model)
    removed = validate_layer_indices(indices, len(current))
    kept = [i for i in range(len(current)) if i not in set(removed)]
    rebuild_layers(model, [current[i] for i in kept], kept, adapter)
    return removed


def replace_block(
    model: PreTrainedModel,
    start: int,
    end: int,
    replacement: nn.Module,
    source_index: int | None = None,
    adapter: ArchitectureAdapter | None = None,
) -> None:
    """Replace decoder layers ``[start, end)`` by one ``replacement`` layer in place.

    ``source_index`` is the layer (inside the block) whose config entries the replacement takes;
    by default the block's first layer.
    """
    adapter = adapter or adapter_for(model)
    current = adapter.decoder_layers(model)
    if not 0 <= start < end <= len(current):
        raise UsageError(f"block [{start}, {end}) is not a valid run of layers of a {len(current)}-layer model")
    if end - start == len(current):
        raise UsageError("cannot replace every layer of the model; keep at least one original layer")
    source = start if source_index is None else source_index
    if not start <= source < end:
        raise UsageError(f"source layer {source} lies outside the replaced block [{start}, {end})")
    layers = [*current[:start], replacement, *current[end:]]
    sources = [*range(start), source, *range(end, len(current))]
    rebuild_layers(model, layers, sources, adapter)


def consecutive_runs(indices: list[int]) -> list[tuple[int, int]]:
    """``[3, 4, 5, 9]`` -> ``[(3, 6), (9, 10)]`` (half-open runs)."""
    runs: list[tuple[int, int]] = []
    for index in sorted(indices):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
