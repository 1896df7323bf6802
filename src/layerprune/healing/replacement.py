"""Layer replacement (LLM-Streamline, Chen et al. 2024): one light module stands in for a block.

For a removed run of consecutive layers ``[i, i + n)`` of the *original* model, we record the
hidden state entering layer ``i`` and the one leaving layer ``i + n - 1`` on the training data,
and train one module to map the first to the second by MSE. The pairs are written to disk in
chunks and memory-mapped, so memory stays bounded however many there are, and they are cached
by content so a second run (or a resumed one) skips the teacher passes. The rest of the pruned
model's cut (its other removed layers, and the attention and MLP branches a sub-layer cut removed) is
made on the original again before the module goes in, so the result keeps all of it removed.

Two kinds, both stored as one ordinary decoder layer of the model's own class so that plain
transformers loads the result:

* ``layer``: a copy of the block's first layer, all of it trained.
* ``ffn``: the same copy with its attention output projection (and bias) zeroed and the whole
  attention frozen, so the layer computes exactly ``x + MLP(norm(x))``: a pre-norm MLP block.
  The model card says that this layer's attention contributes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn

from layerprune.cache import cache_dir
from layerprune.data import TrainingSet
from layerprune.distributed import process_state
from layerprune.errors import OptionError, UsageError, mention
from layerprune.healing.base import HEALERS, HealConfig, Healer, HealOutcome
from layerprune.healing.engine import LossFn, train
from layerprune.models.editing import prune, replace
from layerprune.models.hooks import capture_io, layer_output
from layerprune.models.lineage import LineageCut, lineage_cut
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import consecutive_runs, parse_layer_list
from layerprune.options import Config, Parse, option
from layerprune.outputs import atomic_cache_dir

PAIR_CHUNK_ROWS = 64
_FFN_NOTE = ("It is stored as a standard decoder layer whose attention output projection is zero, so its "
             "attention contributes nothing and the layer computes x + MLP(norm(x)).")


def parse_block(text: str) -> tuple[int, int]:
    """``"20-27"`` (inclusive, like --layers) -> the half-open run ``(20, 28)``."""
    indices = parse_layer_list(text)
    if len(indices) < 2 or indices != list(range(indices[0], indices[-1] + 1)):
        raise OptionError.about("block", f"{text!r} must be a range of at least two consecutive layers, e.g. 20-27")
    return indices[0], indices[-1] + 1


class ReplacementOptions(Config):
    block: Annotated[tuple[int, int] | None, Parse(parse_block)] = option(
        None, "the removed run to replace, original layer indices, e.g. 20-27 (in Python and recipes the half-open "
        "[start, end)); default: the one removed run, read from layerprune.json", metavar="START-END")

    def check(self) -> None:
        if self.block is not None and (len(self.block) != 2 or not 0 <= self.block[0] < self.block[1] - 1):
            raise UsageError(f"block {list(self.block)} must name at least two consecutive layers as [start, end)")


def locate_block(loaded: LoadedModel, settings: HealConfig) -> tuple[tuple[int, int], LineageCut]:
    """The block to replace (original indices), from flags or lineage, and the rest of the lineage's cut:
    the other removed layers and the removed attention and MLP branches, which the result keeps removed."""
    lineage = loaded.lineage
    if lineage.get("replaced_blocks") or lineage.get("healing"):
        raise UsageError("replacement rebuilds the model from the original weights, but this model was already "
                         "replaced or healed; start from the plainly pruned checkpoint")
    cut = lineage_cut(lineage)
    runs = ", ".join(f"{a}-{b - 1}" for a, b in consecutive_runs(cut.layers)) or "none"
    if settings.options.block is not None:
        block = tuple(settings.options.block)
        if cut.removes_anything and not set(range(*block)) <= set(cut.layers):
            # the module stands in for whole removed layers; a block over kept layers or branches would cut them too
            raise OptionError.about("block", f"{block[0]}-{block[1] - 1} is not a run of removed whole layers of this "
                                             f"model (removed: {runs}); name one of those, or give the unpruned model "
                                             "to cut and replace it in one step")
    else:
        long_runs = [run for run in consecutive_runs(cut.layers) if run[1] - run[0] >= 2]
        if len(long_runs) != 1:
            raise UsageError(f"replacement needs one removed run of >= 2 consecutive layers; the removed runs are: "
                             f"{runs}. Name the block with {mention('block')} START-END (original layer indices)")
        block = long_runs[0]
    return block, cut._replace(layers=[i for i in cut.layers if not block[0] <= i < block[1]])


def replacement_layer(original: LoadedModel, start: int, kind: str) -> nn.Module:
    """A trainable copy of original layer ``start``; for ``ffn``, with its attention zeroed and frozen."""
    layer = copy.deepcopy(original.adapter.decoder_layers(original.model)[start]).float()
    layer.requires_grad_(True)
    if kind == "ffn":
        for path in original.adapter.attention_outputs:
            projection = layer.get_submodule(path)
            with torch.no_grad():
                for parameter in projection.parameters():
                    parameter.zero_()
            attention = layer.get_submodule(path.rpartition(".")[0]) if "." in path else projection
            attention.requires_grad_(False)
    return layer


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def block_io(original: LoadedModel, start: int, end: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Hidden state into layer ``start``, out of layer ``end - 1``, and the layer's other arguments.

    The model runs only as far as the block's end. The other arguments (rotary embeddings, causal
    mask, positions) are what the original layer ``start`` received, so the replacement trains
    under exactly the conditions it will run in.
    """
    layers = original.adapter.decoder_layers(original.model)
    device = original.model.device
    with torch.no_grad(), capture_io(layers[start], layers[end - 1]) as captured:
        original.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    assert captured.input is not None and captured.output is not None, "the block's hooks did not run"
    kwargs = {k: v for k, v in captured.kwargs.items() if k not in ("hidden_states", "past_key_values")}
    return captured.input.float().cpu(), captured.output.float().cpu(), kwargs


class PairStore:
    """Teacher pairs in memory-mapped ``.npy`` chunks: random access without loading them all."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        self.folder = folder
        self.inputs = [np.load(folder / f"inputs-{i:05d}.npy", mmap_mode="r") for i in range(meta["chunks"])]
        self.outputs = [np.load(folder / f"outputs-{i:05d}.npy", mmap_mode="r") for i in range(meta["chunks"])]
        self.mask = torch.load(folder / "mask.pt", weights_only=True)
        self.offsets = np.cumsum([0] + [len(chunk) for chunk in self.inputs])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _rows(self, chunks: list[np.ndarray], rows: list[int]) -> torch.Tensor:
        picked = []
        for row in rows:
            chunk = int(np.searchsorted(self.offsets, row, side="right") - 1)
            picked.append(np.asarray(chunks[chunk][row - self.offsets[chunk]]))
        return torch.from_numpy(np.stack(picked))

    def take(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"inputs": self._rows(self.inputs, rows), "outputs": self._rows(self.outputs, rows),
                "mask": self.mask[torch.tensor(rows, dtype=torch.long)]}


def pair_cache_folder(original: LoadedModel, block: tuple[int, int], data: TrainingSet) -> Path:
    """Keyed by the original's weights (not its name), the block and the data: never a stale hit."""
    hasher = hashlib.sha256(json.dumps([list(block), data.digest()]).encode())
    for name, tensor in original.model.state_dict().items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return cache_dir() / "healing-pairs" / hasher.hexdigest()[:20]


def _batches(data: TrainingSet, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, len(data), size):
        yield data.input_ids[first:first + size], data.attention_mask[first:first + size]


def cached_pairs(original: LoadedModel, block: tuple[int, int], data: TrainingSet, batch_size: int) -> PairStore:
    """Build (or reuse) the teacher pairs for ``block`` on ``data``; never more than a chunk in memory."""
    folder = pair_cache_folder(original, block, data)
    if (folder / "meta.json").is_file():
        return PairStore(folder)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    chunks = 0
    with atomic_cache_dir(folder) as staging:

        def flush() -> None:
            nonlocal chunks, inputs, outputs
            np.save(staging / f"inputs-{chunks:05d}.npy", torch.cat(inputs).numpy())
            np.save(staging / f"outputs-{chunks:05d}.npy", torch.cat(outputs).numpy())
            chunks, inputs, outputs = chunks + 1, [], []

        for ids, mask in _batches(data, batch_size):
            entering, leaving, _ = block_io(original, block[0], block[1], ids, mask)
            inputs.append(entering)
            outputs.append(leaving)
            if sum(len(t) for t in inputs) >= PAIR_CHUNK_ROWS:
                flush()
        if inputs:
            flush()
        torch.save(data.attention_mask.clone(), staging / "mask.pt")
        (staging / "meta.json").write_text(json.dumps({"chunks": chunks, "rows": len(data), "block": list(block),
                                                       "source": original.source}))
    return PairStore(folder)


def mse_loss(layer_kwargs: dict[str, Any]) -> LossFn:
    """Summed per-token MSE (mean over the hidden size) on real tokens between module and block output."""
    def loss(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = _to_device(layer_kwargs, batch["inputs"].device)
        predicted = layer_output(module(batch["inputs"], **kwargs))
        per_token = (predicted.float() - batch["outputs"]).pow(2).mean(dim=-1)
        return (per_token * batch["mask"]).sum()

    return loss


class _Replacement(Healer):
    kind: str
    options_class = ReplacementOptions
    default_lr = 1e-4
    rebuilds_from_original = True

    def needs_original(self, settings: HealConfig) -> bool:
        return True

    def check(self, loaded: LoadedModel, settings: HealConfig) -> None:
        super().check(loaded, settings)
        locate_block(loaded, settings)

    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealConfig,
            original: LoadedModel | None) -> HealOutcome:
        assert original is not None, "replacement healing always receives the original model"
        (start, end), others = locate_block(loaded, settings)
        if end > original.num_layers:
            raise UsageError(f"block {start}-{end - 1} lies outside the original model's {original.num_layers} layers")
        with process_state().main_process_first():  # one process computes the pairs, the others reuse them
            pairs = cached_pairs(original, (start, end), data, settings.training.batch_size)
        _, _, layer_kwargs = block_io(original, start, end, data.input_ids[:1],
                                      torch.ones_like(data.input_ids[:1]))
        module = replacement_layer(original, start, self.kind)
        mask_sums = pairs.mask.sum(dim=1)
        report = train(module, pairs, mse_loss(layer_kwargs), lambda rows: float(mask_sums[rows].sum()), settings,
                       lr=settings.training.lr or self.default_lr, fingerprint=settings.fingerprint(),
                       label=f"replace-{self.kind}")
        module.requires_grad_(False).to(next(original.model.parameters()).dtype)
        for key in ("reason", "recipe"):
            if key in loaded.lineage:
                original.lineage[key] = loaded.lineage[key]
        # the rest of the cut, made on the original before the block's module goes in (a model with a replaced
        # block takes no branch cut): every removed layer and branch outside the block stays removed
        whole = (prune(original, others.layers, loaded.lineage.get("reason", "layers named by the user"),
                       attention=others.attention, mlp=others.mlp) if others.removes_anything else [])
        shift = sum(1 for i in whole if i < start)
        note = _FFN_NOTE if self.kind == "ffn" else "It is a decoder layer initialised from the block's first layer."
        replace(original, start - shift, end - shift, module, self.kind, note, source_index=start - shift)
        summary = (f"layers {start}..{end - 1} replaced by one trained `{self.kind}` module "
                   f"(MSE to the original block's output on {len(pairs)} sequences)")
        return HealOutcome(original, summary, report.trainable_parameters, report.losses, report.seconds)


@HEALERS.register("replace-ffn")
class ReplaceWithFFN(_Replacement):
    kind = "ffn"


@HEALERS.register("replace-layer")
class ReplaceWithLayer(_Replacement):
    kind = "layer"
