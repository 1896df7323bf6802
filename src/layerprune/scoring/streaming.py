"""Layer-streaming scoring: score a model whose weights do not fit in memory.

The model is never built. A skeleton of it lives on the ``meta`` device (no storage); its
embedding gets real weights only for the token ids the calibration data uses, and one run of the
base model with every decoder layer stubbed out records what each layer would receive (its input
and the exact masks / rotary embeddings / per-layer-type variants the family builds). Then the
layers are loaded from the safetensors shards **one at a time**; every calibration batch is pushed
through the loaded layer, each requested metric's :class:`~layerprune.scoring.base.LayerPass` sees
the layer and its activations (the similarity sums, the weight norms, the ``ppl`` candidate
streams), and the layer is freed before the next one is read.

Each layer is read from disk once. What must survive between layers (the current hidden states,
the unit inputs of earlier layers for ``angular``/``block-cosine``, one partial stream per skipped
layer for ``ppl``) stays in memory or, with ``spill_dir``, goes to disk batch by batch, so resident
memory is one layer plus a few batches of activations whatever the model's size.

Under ``torch.distributed`` (``torchrun``/``accelerate launch``) each process streams its share of
the calibration rows and the sums are all-reduced, so N processes give the scores of one.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from layerprune.data.rows import CalibrationLike, CalibrationSet
from layerprune.distributed import all_reduce_sums, process_state
from layerprune.errors import UsageError
from layerprune.models.hooks import StopForward, layer_input, until_stopped
from layerprune.models.lineage import read_lineage
from layerprune.models.loading import LoadedModel, resolve_dtype
from layerprune.models.shards import checkpoint_shards, layer_key_prefix, load_checkpoint_config, read_header
from layerprune.scoring.base import METRICS, LayerPass, ScoringContext, metric_options
from layerprune.scoring.forward import Head, LayerCall, check_finite, next_token_targets, replay_layer
from layerprune.scoring.config import DEFAULT_SCORE, ScoreConfig
from layerprune.scoring.report import ScoreReport, check_score_options, describe_data

_ROW_CHUNK = 4096  # embedding rows read at a time when gathering the used ones


class Checkpoint:
    """Tensors of a safetensors checkpoint folder by name, read one at a time (never all)."""

    def __init__(self, folder: Path) -> None:
        paths, _ = checkpoint_shards(folder)
        self.where = {t.name: path for path in paths for t in read_header(path).tensors}

    def key_for(self, module_name: str) -> str | None:
        """The checkpoint's name for a module tensor; base checkpoints may drop leading parts
        (GPT-2's ``h.0.`` for ``transformer.h.0.``)."""
        parts = module_name.split(".")
        return next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in self.where), None)

    def tensor(self, key: str, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``key`` in ``dtype``; with ``rows``, only those rows (read in chunks, so a
        large embedding is never whole in memory)."""
        with safe_open(self.where[key], "pt") as handle:
            if rows is None:
                return handle.get_tensor(key).to(dtype)
            sliced = handle.get_slice(key)
            parts = []
            for start in range(0, int(sliced.get_shape()[0]), _ROW_CHUNK):
                wanted = rows[(rows >= start) & (rows < start + _ROW_CHUNK)]
                if len(wanted):
                    parts.append(sliced[start:start + _ROW_CHUNK][wanted - start].to(dtype))
            return torch.cat(parts)


class ActivationStore:
    """Hidden states kept between layers: in a dict, or one file per tensor under ``spill_dir``
    (read back in full with ordinary file I/O, so they never count as resident while unused)."""

    def __init__(self, spill_dir: Path | None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="layerprune-stream-", dir=spill_dir)) if spill_dir else None
        self.memory: dict[tuple[Any, ...], torch.Tensor] = {}

    def put(self, key: tuple[Any, ...], value: torch.Tensor) -> None:
        if self.folder is None:
            self.memory[key] = value
        else:
            torch.save(value, self.folder / "-".join(map(str, key)))

    def get(self, key: tuple[Any, ...]) -> torch.Tensor:
        if self.folder is None:
            return self.memory[key]
        return torch.load(self.folder / "-".join(map(str, key)), weights_only=True)

    def close(self) -> None:
        self.memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class _Batch:
    """One calibration batch: its masks, targets, and the extra arguments each layer receives."""

    attention_mask: torch.Tensor
    where: torch.Tensor
    targets: torch.Tensor
    calls: list[LayerCall]


@contextmanager
def _stubbed_layers(layers: nn.ModuleList, calls: list[LayerCall], first_input: list[torch.Tensor]) -> Iterator[None]:
    """Make every decoder layer record its arguments and pass its input on, untouched."""

    def stub_for(index: int) -> Any:
        def stub(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = layer_input(args, kwargs)
            if index == 0:
                first_input.append(hidden)
            rest = dict(kwargs)
            if "hidden_states" in rest:
                rest["hidden_states"] = None  # replay_layer puts the real input back; keep no copy
            calls.append((args[1:], rest))
            if index == len(layers) - 1:
                raise StopForward  # the skeleton's forward ends at the last decoder layer
            return hidden

        return stub

    for index, layer in enumerate(layers):
        layer.forward = stub_for(index)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class StreamingScorer:
    """Scores the checkpoint in ``folder`` layer by layer (see the module docstring)."""

    def __init__(self, folder: str | Path, dtype: str | torch.dtype | None = "auto") -> None:
        self.folder = Path(folder).expanduser().resolve()
        config, self.adapter = load_checkpoint_config(self.folder)
        self.dtype = resolve_dtype(dtype, torch.device("cpu"))
        self.checkpoint = Checkpoint(self.folder)
        self.prefix = layer_key_prefix(self.checkpoint.where, self.adapter.layers)
        with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.skeleton.eval()
        self.layers = self.adapter.decoder_layers(self.skeleton)

    def _materialise(self, module: nn.Module, name: str, rows: torch.Tensor | None = None) -> None:
        """Give ``module``'s parameters (``name`` is its path) real weights from the checkpoint."""
        for local, _ in list(module.named_parameters(recurse=True)):
            full = f"{name}.{local}" if name else local
            key = self.checkpoint.key_for(full)
            if key is None and full == f"{self.adapter.lm_head}.weight":
                key = self._head_key()
            if key is None:
                raise UsageError(f"the checkpoint in {self.folder} has no tensor for {full}; is it complete?")
            owner, _, attribute = local.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            value = self.checkpoint.tensor(key, self.dtype, rows if attribute == "weight" else None)
            setattr(target, attribute, nn.Parameter(value, requires_grad=False))

    def _head_key(self) -> str | None:
        """Where the LM head lives when not under its module name: under the family's checkpoint
        name (GPT-NeoX's ``embed_out``), or, in tied models, only as the embedding."""
        renamed = self.adapter.checkpoint_name(f"{self.adapter.lm_head}.weight")
        if renamed in self.checkpoint.where:
            return renamed
        if getattr(self.skeleton.config, "tie_word_embeddings", False):
            return self.checkpoint.key_for(f"{self.adapter.embeddings}.weight")
        return None

    def _outside_layers(self) -> list[tuple[str, nn.Module]]:
        """The modules before the decoder layers that have weights (embeddings, positions, project_in)."""
        base_path = self.adapter.layers.rpartition(".")[0]
        base = self.skeleton.get_submodule(base_path)
        skip = {self.adapter.layers, *self.adapter.pre_head_paths(self.skeleton)}
        return [(f"{base_path}.{name}", child) for name, child in base.named_children()
                if f"{base_path}.{name}" not in skip and any(True for _ in child.parameters())]

    @torch.no_grad()
    def capture(self, calibration: CalibrationSet, batch_size: int, store: ActivationStore) -> list[_Batch]:
        """Run the skeleton with stubbed layers: store each batch's input to layer 0 and record
        the arguments of every layer. Only the rows of the embedding the data uses are read."""
        used = torch.unique(calibration.input_ids)
        token_embedding = self.skeleton.get_submodule(self.adapter.embeddings)
        for name, module in self._outside_layers():
            self._materialise(module, name, used if module is token_embedding else None)
        token_embedding.padding_idx = None  # its index may not exist among the gathered rows
        batches = []
        try:
            for index, batch in enumerate(calibration.batches(batch_size)):
                input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
                calls: list[LayerCall] = []
                first: list[torch.Tensor] = []
                with _stubbed_layers(self.layers, calls, first), until_stopped():
                    self.skeleton.base_model(input_ids=torch.searchsorted(used, input_ids),
                                             attention_mask=attention_mask, use_cache=False)
                store.put(("x", index), first[0])
                where, targets = next_token_targets(input_ids, attention_mask)
                batches.append(_Batch(attention_mask, where, targets, calls))
        finally:
            for _, module in self._outside_layers():
                module.to("meta")
        return batches

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its real weights, freed (back to meta) afterwards."""
        layer = self.layers[index]
        state = {name: self.checkpoint.tensor(f"{self.prefix}.{index}.{name}", self.dtype)
                 for name in layer.state_dict()}
        layer.load_state_dict(state, assign=True, strict=True)
        try:
            yield layer
        finally:
            layer.to("meta")
            _return_freed_memory()

    @contextmanager
    def head(self) -> Iterator[Head]:
        """The modules after the decoder layers (final norm, head projection, LM head) with real weights, for ``ppl``."""
        parts = [*self.adapter.pre_head_paths(self.skeleton), self.adapter.lm_head]
        modules = [(name, self.skeleton.get_submodule(name)) for name in parts]
        for name, module in modules:
            self._materialise(module, name)
        try:
            yield Head(LoadedModel(self.skeleton, None, str(self.folder), self.adapter))  # type: ignore[arg-type]
        finally:
            for _, module in modules:
                module.to("meta")


def open_streaming(folder: str | Path) -> LoadedModel:
    """The checkpoint in ``folder`` as a :class:`LoadedModel` whose weights are all on ``meta``
    (no memory) plus its tokenizer: enough to build calibration data and read the config
    before :func:`stream_score` streams the layers."""
    scorer = StreamingScorer(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(scorer.folder)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load the tokenizer of {scorer.folder}: {str(error).splitlines()[0]}") from None
    return LoadedModel(scorer.skeleton, tokenizer, str(scorer.folder), scorer.adapter, scorer.folder,
                       read_lineage(scorer.folder))


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS after each layer. glibc keeps them for reuse, and the
    activations of every layer's forward leave a slightly different pattern, so without this the
    resident size creeps up layer after layer instead of staying one layer's working set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back
        pass


def _rank_rows(calibration: CalibrationSet) -> CalibrationSet:
    """This process's share of the rows when several were launched (all of them otherwise).
    Asking accelerate for the process state also sets up the process group under a launcher."""
    state = process_state()
    rank, world = state.process_index, state.num_processes
    if world == 1:
        return calibration
    if calibration.input_ids.shape[0] < world:
        raise UsageError(f"{calibration.input_ids.shape[0]} calibration rows cannot be shared by {world} processes; "
                         "use more rows or fewer processes")
    return CalibrationSet(calibration.input_ids[rank::world], calibration.attention_mask[rank::world],
                          calibration.info)


STREAMING_BATCH_SIZE = 1
"""The batch of a streamed scoring unless given, instead of :class:`ScoreConfig`'s: each layer is
loaded once whatever the batch, so larger batches buy little speed for the activation memory
streaming exists to save."""


def check_streamable(config: ScoreConfig) -> None:
    """Refuse what cannot run layer by layer: branches (streaming holds one whole layer at a time) and
    metrics that cannot, each with its reason (its ``streaming_refusal``)."""
    if config.granularity != "layer":
        config.refuse("granularity", "sublayer: layer streaming scores whole layers; score the branches in memory "
                                     "(without --streaming)")
    names = list(config.metrics)
    refused = {n: METRICS.get(n).streaming_refusal for n in names if METRICS.get(n).streaming_refusal}
    if refused:
        streamable = [n for n in METRICS.names() if not METRICS.get(n).streaming_refusal]
        raise UsageError(f"metric(s) {', '.join(refused)} cannot be computed layer by layer "
                         f"({'; '.join(map(str, refused.values()))}); stream only {', '.join(streamable)}, or score "
                         "in memory without --streaming")


def stream_score(
    folder: str | Path,
    calibration: CalibrationLike | torch.Tensor | None,
    metrics: Sequence[str] | str = DEFAULT_SCORE.metrics,
    *,
    batch_size: int = STREAMING_BATCH_SIZE,
    dtype: str | torch.dtype | None = "auto",
    spill_dir: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    data: dict[str, Any] | None = None,
    granularity: str = "layer",
    **options: Any,
) -> ScoreReport:
    """Score the safetensors checkpoint in ``folder`` one decoder layer at a time.

    Same arguments and the same :class:`ScoreReport` as :func:`layerprune.scoring.score` (scores
    equal up to float rounding), plus ``spill_dir``: where activations go between layers instead
    of memory. ``batch_size`` defaults to one row: each layer is loaded once whatever the batch, so
    larger batches only buy some speed (~20% on SmolLM2) at the price of activation memory, which is
    what streaming exists to save. ``dtype`` is the compute dtype (float32 on CPU by default, as ``load_model``).
    """
    config = check_score_options(metrics, batch_size, granularity, **options)
    check_streamable(config)
    names = list(config.metrics)
    wanting = [n for n in names if METRICS.get(n).needs_data]
    if wanting and calibration is None:
        raise UsageError(f"metrics {', '.join(wanting)} need calibration data; pass calibration rows (e.g. "
                         "build_calibration's; on the command line --data)")
    rows = CalibrationSet.of(calibration) if calibration is not None else None
    scorer = StreamingScorer(folder, dtype)
    loaded = LoadedModel(scorer.skeleton, tokenizer, str(scorer.folder), scorer.adapter,  # type: ignore[arg-type]
                         scorer.folder, read_lineage(scorer.folder))
    context = ScoringContext(loaded, rows, batch_size=batch_size, options=metric_options(names, options))
    passes = list({id(p): p for p in (METRICS.get(n).layer_pass(context, n) for n in names) if p is not None}.values())
    if passes:
        _stream(scorer, _rank_rows(rows) if rows is not None else None, passes, context, spill_dir)
    results = {name: METRICS.get(name).compute(context, name) for name in names}
    return ScoreReport(model=str(scorer.folder), num_layers=len(scorer.layers), tokens=rows.tokens if rows else 0,
                       layer_ids=loaded.original_layer_ids, results=results,
                       data=describe_data(data, rows, batch_size, context.options, streaming=True), config=config)


@dataclass
class _Stream:
    """The :class:`~layerprune.scoring.base.Stream` the metrics' passes see."""

    scorer: StreamingScorer
    store: ActivationStore
    batches: list[_Batch]

    def hidden(self, batch: int) -> torch.Tensor:
        return self.store.get(("x", batch))

    def replay(self, layer: nn.Module, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        return replay_layer(layer, hidden, *self.batches[batch].calls[index])

    def head(self) -> AbstractContextManager[Head]:
        return self.scorer.head()

    def all_reduce(self, *tensors: torch.Tensor) -> None:
        all_reduce_sums(*tensors)


def _stream(scorer: StreamingScorer, rows: CalibrationSet | None, passes: list[LayerPass], context: ScoringContext,
            spill_dir: str | Path | None) -> None:
    """The one pass over the layers: each loaded layer goes to every metric's pass, and every batch
    through the layer to the passes that need activations; the passes then finish into ``context``."""
    watching = [p for p in passes if p.needs_activations]
    store = ActivationStore(Path(spill_dir) if spill_dir is not None else None)
    try:
        batches = scorer.capture(rows, context.batch_size, store) if rows is not None and watching else []
        stream = _Stream(scorer, store, batches)
        with torch.no_grad():
            for j in range(len(scorer.layers)):
                with scorer.layer(j) as layer:
                    for layer_pass in passes:
                        layer_pass.on_layer(j, layer)
                    for b in range(len(batches)):
                        x_in = stream.hidden(b)
                        x_out = stream.replay(layer, j, b, x_in)
                        check_finite(j, x_out, batches[b].attention_mask)
                        for layer_pass in watching:
                            layer_pass.on_batch(j, b, x_in, x_out, layer, stream)
                        store.put(("x", b), x_out)
        for layer_pass in passes:
            layer_pass.finish(stream)
    finally:
        store.close()
