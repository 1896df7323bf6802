"""Layer-streaming scoring: score a model whose weights do not fit in memory.

The model is never built. A skeleton of it lives on the ``meta`` device (no storage); its
embedding gets real weights only for the token ids the calibration data uses, and one run of the
base model with every decoder layer stubbed out records what each layer would receive (its input
and the exact masks / rotary embeddings / per-layer-type variants the family builds). Then the
layers are loaded from the safetensors shards **one at a time**; every calibration batch is pushed
through the loaded layer, the similarity sums (:class:`SimilarityAccumulator`), the weight norms and
the ``ppl`` candidate streams are updated, and the layer is freed before the next one is read.

Each layer is read from disk once. What must survive between layers (the current hidden states,
the unit inputs of earlier layers for ``angular``/``block-cosine``, one partial stream per skipped
layer for ``ppl``) stays in memory or, with ``spill_dir``, goes to disk batch by batch, so resident
memory is one layer plus a few batches of activations whatever the model's size.

Under ``torch.distributed`` (``torchrun``/``accelerate launch``) each process streams its share of
the calibration rows and the sums are all-reduced, so N processes give the scores of one.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
from layerprune.scoring.accumulators import SimilarityAccumulator, unit_rows
from layerprune.scoring.base import METRICS, MetricResult, ScoringContext
from layerprune.scoring.forward import Head, check_finite, next_token_targets, replay_layer, scored_positions
from layerprune.scoring.report import ScoreReport, check_score_options

SIMILARITY = ("bi", "angular", "block-cosine")
MAGNITUDE = {"magnitude-l1": 1, "magnitude-l2": 2}
WITHOUT_MODEL = ("reverse-order", "random")
STREAMABLE = (*SIMILARITY, *MAGNITUDE, "ppl", *WITHOUT_MODEL)
_ROW_CHUNK = 4096  # embedding rows read at a time when gathering the used ones

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]


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
    keep: torch.Tensor
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
    def capture(self, calibration: CalibrationSet, batch_size: int, positions: str,
                store: ActivationStore) -> list[_Batch]:
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
                batches.append(_Batch(attention_mask, scored_positions(attention_mask, positions), where, targets,
                                      calls))
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


def check_streamable(names: list[str]) -> None:
    refused = [n for n in names if n not in STREAMABLE]
    if refused:
        raise UsageError(f"metric(s) {', '.join(refused)} cannot be computed layer by layer (taylor needs "
                         f"gradients through the whole model); stream only {', '.join(STREAMABLE)}, or score "
                         "in memory without --streaming")


def stream_score(
    folder: str | Path,
    calibration: CalibrationLike | torch.Tensor | None,
    metrics: list[str] | str = ("bi",),
    *,
    batch_size: int = 1,
    positions: str = "all",
    seed: int = 0,
    dtype: str | torch.dtype | None = "auto",
    spill_dir: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    data: dict[str, Any] | None = None,
) -> ScoreReport:
    """Score the safetensors checkpoint in ``folder`` one decoder layer at a time.

    Same arguments and the same :class:`ScoreReport` as :func:`layerprune.scoring.score` (scores
    equal up to float rounding), plus ``spill_dir``: where activations go between layers instead
    of memory. ``batch_size`` defaults to one row: each layer is loaded once whatever the batch, so
    larger batches only buy some speed (~20% on SmolLM2) at the price of activation memory, which is
    what streaming exists to save. ``dtype`` is the compute dtype (float32 on CPU by default, as ``load_model``).
    """
    names = check_score_options(metrics, batch_size, positions)
    check_streamable(names)
    wanting = [n for n in names if METRICS.get(n).needs_data]
    if wanting and calibration is None:
        raise UsageError(f"metrics {', '.join(wanting)} need calibration data; pass --data (e.g. --data wiki-sample)")
    rows = CalibrationSet.of(calibration) if calibration is not None else None
    scorer = StreamingScorer(folder, dtype)
    loaded = LoadedModel(scorer.skeleton, tokenizer, str(scorer.folder), scorer.adapter,  # type: ignore[arg-type]
                         scorer.folder, read_lineage(scorer.folder))
    context = ScoringContext(loaded, rows, batch_size=batch_size, positions=positions, seed=seed)
    streamed = _stream(scorer, _rank_rows(rows) if rows is not None else None, names, context, spill_dir)
    results = {name: streamed[name] if name in streamed else METRICS.get(name).compute(context, name) for name in names}
    described = dict(data or {})
    if rows is not None:
        described.setdefault("source", rows.description)
        described.update(rows=int(rows.input_ids.shape[0]), seq_len=int(rows.input_ids.shape[1]))
    described.update(positions=positions, batch_size=batch_size, seed=seed, streaming=True)
    return ScoreReport(model=str(scorer.folder), num_layers=len(scorer.layers), tokens=rows.tokens if rows else 0,
                       layer_ids=loaded.original_layer_ids, data=described, results=results, context=context)


def _stream(scorer: StreamingScorer, rows: CalibrationSet | None, names: list[str], context: ScoringContext,
            spill_dir: str | Path | None) -> dict[str, MetricResult]:
    """The one pass over the layers; returns the metrics it computes itself (magnitude, ppl) and
    leaves the similarity sums in ``context`` for the registered similarity metrics to read."""
    count = len(scorer.layers)
    similarity = SimilarityAccumulator(count) if any(n in SIMILARITY for n in names) else None
    pairs = any(n in ("angular", "block-cosine") for n in names)  # all i <= j, not only i == j
    ppl = "ppl" in names
    norms = {name: torch.zeros(count, dtype=torch.float64) for name in names if name in MAGNITUDE}
    if not norms and (rows is None or (similarity is None and not ppl)):
        return {}
    if ppl and rows is not None and not bool(next_token_targets(rows.input_ids, rows.attention_mask)[0].any()):
        raise UsageError("ppl needs rows with at least two real tokens; raise --seq-len or use other data")
    store = ActivationStore(Path(spill_dir) if spill_dir is not None else None)
    try:
        batches = scorer.capture(rows, context.batch_size, context.positions, store) if rows is not None else []
        with torch.no_grad():
            for j in range(count):
                with scorer.layer(j) as layer:
                    for name, total in norms.items():
                        total[j] = sum(float(torch.linalg.vector_norm(p.double(), ord=MAGNITUDE[name]))
                                       for p in layer.parameters())
                    for b, batch in enumerate(batches if similarity is not None or ppl else []):
                        x_in = store.get(("x", b))
                        x_out = replay_layer(layer, x_in, *batch.calls[j])
                        check_finite(j, x_out, batch.attention_mask)
                        if similarity is not None:
                            _add_similarity(similarity, store, j, b, x_in[batch.keep], x_out[batch.keep], pairs)
                        if ppl:
                            for skipped in range(j):
                                h = store.get(("h", skipped, b))
                                store.put(("h", skipped, b), replay_layer(layer, h, *batch.calls[j]))
                            store.put(("h", j, b), x_in)
                        store.put(("x", b), x_out)
        results = {name: MetricResult(name, total.tolist(), total.tolist(), METRICS.get(name).meaning)
                   for name, total in norms.items()}
        if similarity is not None:
            all_reduce_sums(similarity.cos_sum, similarity.angle_sum, similarity.count)
            context.cached("similarity", lambda: similarity)
        if ppl:
            results["ppl"] = _perplexities(scorer, store, batches, count)
        return results
    finally:
        store.close()


def _add_similarity(accumulator: SimilarityAccumulator, store: ActivationStore, j: int, b: int,
                    x_in: torch.Tensor, x_out: torch.Tensor, pairs: bool) -> None:
    unit_out = unit_rows(x_out)
    unit_in = unit_rows(x_in)
    if not pairs:
        accumulator.add_cosines([j], j, (unit_in * unit_out).sum(dim=-1)[None])
        return
    store.put(("u", j, b), unit_in)
    for i in range(j + 1):
        accumulator.add_cosines([i], j, (store.get(("u", i, b)) * unit_out).sum(dim=-1)[None])


def _perplexities(scorer: StreamingScorer, store: ActivationStore, batches: list[_Batch], count: int) -> MetricResult:
    """Finish ``ppl``: each candidate stream (and the full model) through the head."""
    removed = torch.zeros(count, dtype=torch.float64)
    full = torch.zeros(1, dtype=torch.float64)
    targets = torch.tensor([sum(int(b.where.sum()) for b in batches)], dtype=torch.float64)
    with scorer.head() as head, torch.no_grad():
        for b, batch in enumerate(batches):
            if not bool(batch.where.any()):
                continue
            full += float(head.nll_sum(store.get(("x", b)), batch.where, batch.targets))
            for skipped in range(count):
                removed[skipped] += float(head.nll_sum(store.get(("h", skipped, b)), batch.where, batch.targets))
    all_reduce_sums(removed, full, targets)
    total = float(targets)
    perplexities = [math.exp(float(nll) / total) for nll in removed]
    return MetricResult("ppl", perplexities, perplexities, METRICS.get("ppl").meaning,
                        details={"full_model": math.exp(float(full) / total), "targets": int(total)})

