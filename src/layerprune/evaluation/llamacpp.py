"""llama.cpp as a runtime: the perplexity and CPU speed of a ``.gguf`` model where small models are run.

``layerprune eval --runtime llamacpp`` measures a GGUF file in llama.cpp (through llama-cpp-python,
the ``layerprune[llamacpp]`` extra) as transformers' runtime measures a checkpoint: perplexity by the
same non-overlapping windows (:func:`layerprune.evaluation.perplexity.windows`, every window opened by
the start token where the vocabulary asks for one) and speed as prefill and greedy-decode tokens per
second at batch 1 on the threads stated. With models to compare, each is timed in turns, the order
alternating every turn (ABBA...), in one process, so that a machine that gets busier or cooler
during the run weighs on every model alike; the speed-up is the ratio of medians, set beside the
FLOP-ideal one (the ratio of the weights each token multiplies: every tensor but the embedding
lookup; attention over the context is left out, which at short contexts is small).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from layerprune.data import load_texts
from layerprune.data.calibration import DOCUMENT_SEPARATOR
from layerprune.errors import UsageError
from layerprune.evaluation.config import EvalConfig
from layerprune.evaluation.efficiency import Workload
from layerprune.evaluation.record import PerplexityEntry
from layerprune.evaluation.intervals import perplexity_interval
from layerprune.evaluation.perplexity import PerplexityResult, resolve_ppl_source, windows
from layerprune.models.aliases import MODEL_ALIASES, fetch_alias_gguf
from layerprune.models.gguf_file import open_gguf
from layerprune.models.lineage import versions
from layerprune.options import Config, option
from layerprune.records import checked, known_record

INSTALL = ("llama.cpp's runtime needs llama-cpp-python, built from source: pip install 'layerprune[llamacpp]' "
           "with cmake and a C/C++ compiler, and CMAKE_ARGS set as the README says")


class LlamaCppConfig(Config):
    """How llama.cpp runs: its threads and, when models are compared, the timed turns."""

    unit = "llamacpp"

    threads: int | None = option(None, "CPU threads llama.cpp computes on (none: every core this process may use)",
                                 minimum=1)
    turns: int = option(4, "timed turns of every model, the order alternating each turn; the median is kept",
                        minimum=1)

    @property
    def thread_count(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


def llama_module() -> Any:
    """The ``llama_cpp`` module, or how to install it."""
    try:
        import llama_cpp  # an optional extra, built from source: imported only where it runs
    except ImportError:
        raise UsageError(INSTALL) from None
    return llama_cpp


def check_gguf_model(model: str) -> Path:
    """A ``--runtime llamacpp`` model is a ``.gguf`` file, a folder a GGUF export wrote (``model.gguf``) or
    an alias (its GGUF file as it ships)."""
    alias = MODEL_ALIASES.get(model)
    path = fetch_alias_gguf(alias) if alias is not None else Path(model).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise UsageError(f"{model} holds {len(found)} .gguf files; give the file itself to --runtime llamacpp")
        path = found[0]
    if path.suffix != ".gguf" or not path.is_file():
        raise UsageError(f"--runtime llamacpp runs GGUF files and {model} is none; write one with --format gguf")
    open_gguf(path)  # a broken file is refused in one line, before llama.cpp prints its own failure
    return path


def open_model(path: Path, n_ctx: int, threads: int, *, all_logits: bool) -> Any:
    """A llama.cpp context over ``path``: every position's logits for perplexity, the last one's for speed."""
    llama = llama_module().Llama
    try:
        return llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                     n_threads_batch=threads, logits_all=all_logits, verbose=False)
    except ValueError as error:
        raise UsageError(f"llama.cpp cannot load {path}: {error}") from None


def text_tokens(llm: Any, name: str) -> tuple[list[int], list[int]]:
    """The standard split of perplexity data ``name`` as one stream of llama.cpp's token ids (documents
    joined as :func:`layerprune.data.token_stream` joins them), and the start of every window."""
    spec = resolve_ppl_source(name)
    text = DOCUMENT_SEPARATOR.join(load_texts(spec.source, spec.split, spec.text_field))
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    prefix = [llm.token_bos()] if llm._model.add_bos_token() and llm.token_bos() >= 0 else []
    return list(ids), prefix


def perplexity(llm: Any, token_ids: Sequence[int], seq_len: int, *, max_windows: int | None = None,
               prefix: Sequence[int] = ()) -> PerplexityResult:
    """Perplexity of a llama.cpp context (``all_logits``) on ``token_ids`` by the windows transformers'
    runtime scores (:func:`layerprune.evaluation.perplexity.perplexity`), one window per evaluation."""
    chunks = windows(torch.tensor(list(token_ids), dtype=torch.long), seq_len, prefix)[:max_windows]
    first = max(len(prefix), 1)
    window_nll: list[float] = []
    window_tokens: list[int] = []
    for chunk in chunks:
        ids = chunk.tolist()
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[first - 1:len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        targets = np.asarray(ids[first:])
        window_nll.append(float((log_norm - logits[np.arange(len(targets)), targets]).sum()))
        window_tokens.append(len(targets))
    total = sum(window_tokens)
    nll = math.fsum(window_nll) / total
    low, high = perplexity_interval(window_nll, window_tokens)
    return PerplexityResult(nll=nll, ppl=math.exp(nll), tokens=total, ci95=(low, high))


def time_prefill_decode(llm: Any, workload: Workload) -> tuple[float, float]:
    """Seconds to prefill ``prompt_len`` seeded random tokens and to greedily decode ``new_tokens`` after them."""
    vocab = llm.n_vocab()
    prompt = np.random.default_rng(0).integers(0, vocab, workload.prompt_len).tolist()
    llm.reset()
    began = time.perf_counter()
    llm.eval(prompt)
    prefilled = time.perf_counter()
    for _ in range(workload.new_tokens):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
        llm.eval([int(logits.argmax())])
    return prefilled - began, time.perf_counter() - prefilled


def matmul_weights(path: Path) -> int:
    """Weights each token multiplies in ``path``: every tensor but the input embedding lookup (which is
    the head too when no ``output.weight`` is there: then it counts once, as the head)."""
    tensors = open_gguf(path).tensors
    tied = all(tensor.name != "output.weight" for tensor in tensors)
    return sum(int(t.n_elements) for t in tensors if t.name != "token_embd.weight" or tied)


def speed(paths: Sequence[Path], workload: Workload, settings: LlamaCppConfig) -> list[dict[str, Any]]:
    """Prefill and decode tokens/s of every model in ``paths``: ``turns`` x ``repeats`` timings each, the
    order alternating every turn, all contexts open in one process at once; medians kept."""
    threads = settings.thread_count
    timings: list[list[tuple[float, float]]] = [[] for _ in paths]
    with ExitStack() as stack:
        contexts = [open_model(path, workload.prompt_len + workload.new_tokens, threads, all_logits=False)
                    for path in paths]
        for llm in contexts:
            stack.callback(llm.close)
            for _ in range(workload.warmup):
                time_prefill_decode(llm, workload)
        for turn in range(settings.turns):
            order = list(range(len(paths)))
            for index in order if turn % 2 == 0 else order[::-1]:
                timings[index] += [time_prefill_decode(contexts[index], workload) for _ in range(workload.repeats)]
    results = []
    for path, measured in zip(paths, timings):
        prefill = statistics.median(t for t, _ in measured)
        decode = statistics.median(t for _, t in measured)
        results.append({"model": str(path), "threads": threads, "timings": len(measured),
                        "prefill_tokens_per_s": workload.prompt_len / prefill,
                        "decode_tokens_per_s": workload.new_tokens / decode,
                        "matmul_weights": matmul_weights(path), "file_bytes": path.stat().st_size})
    reference = results[0]
    for result in results:
        result["prefill_speedup"] = result["prefill_tokens_per_s"] / reference["prefill_tokens_per_s"]
        result["decode_speedup"] = result["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
        result["ideal_speedup"] = reference["matmul_weights"] / result["matmul_weights"]
    return results


class SpeedEntry(BaseModel):
    """One model's speed in llama.cpp at batch 1, and its speed-up over the first model of the run."""

    model_config = ConfigDict(extra="forbid")

    threads: int = Field(ge=1)
    timings: int = Field(ge=1, description="timed prefill+decode runs, over every turn")
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    matmul_weights: int = Field(ge=0, description="weights each token multiplies (every tensor but the embedding lookup)")
    file_bytes: int = Field(ge=0)
    prefill_speedup: float = Field(description="over the first model, measured in the same run")
    decode_speedup: float = Field(description="over the first model, measured in the same run")
    ideal_speedup: float = Field(description="the first model's matmul weights / this one's: the FLOP-ideal speed-up")


class LlamaCppModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    perplexity: dict[str, PerplexityEntry] = {}
    speed: SpeedEntry | None = None


@known_record
class LlamaCppReport(BaseModel):
    """What ``layerprune eval --runtime llamacpp`` writes: every model's perplexity and speed in llama.cpp."""

    model_config = ConfigDict(extra="forbid", title="llamacpp-eval.json")

    format_version: int = Field(default=1, ge=1, le=1)
    runtime: str = Field(description="llama.cpp (llama-cpp-python)")
    measured: dict[str, Any] = Field(description="seq_len, max_windows, the speed workload, threads and turns")
    models: list[LlamaCppModel]
    versions: dict[str, str]


def evaluate_gguf(models: Sequence[str], config: EvalConfig, settings: LlamaCppConfig) -> dict[str, Any]:
    """Perplexity (``config.ppl``) and speed (``config.efficiency``) of each GGUF file in llama.cpp; the
    first is the reference the speed-ups are measured against."""
    llama = llama_module()
    paths = [check_gguf_model(model) for model in models]
    entries: list[dict[str, Any]] = [{"model": str(path), "perplexity": {}} for path in paths]
    for entry, path in zip(entries, paths):
        if config.ppl:
            llm = open_model(path, config.seq_len, settings.thread_count, all_logits=True)
            try:
                for name in config.ppl:
                    ids, prefix = text_tokens(llm, name)
                    entry["perplexity"][name] = perplexity(llm, ids, config.seq_len, max_windows=config.max_windows,
                                                           prefix=prefix).as_dict()
            finally:
                llm.close()
    workload = config.workload
    if workload is not None:
        for entry, measured in zip(entries, speed(paths, workload, settings)):
            entry["speed"] = {key: value for key, value in measured.items() if key != "model"}
    return checked(LlamaCppReport, {
        "runtime": f"llama.cpp (llama-cpp-python {llama.__version__})",
        "measured": {"seq_len": config.seq_len, "max_windows": config.max_windows, "threads": settings.thread_count,
                     "turns": settings.turns, "workload": workload.model_dump() if workload else None},
        "models": entries, "versions": versions()})


def report_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per model, speed-ups beside the FLOP-ideal one."""
    names = sorted({name for entry in report["models"] for name in entry["perplexity"]})
    head = ["model", *(f"ppl {name}" for name in names), "MB", "prefill tok/s", "decode tok/s",
            "prefill x", "decode x", "ideal x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in report["models"]:
        measured = entry.get("speed") or {}
        cells = [Path(entry["model"]).name if Path(entry["model"]).name != "model.gguf" else entry["model"],
                 *(f"{entry['perplexity'][n]['ppl']:.2f}" if n in entry["perplexity"] else "" for n in names)]
        cells += [f"{measured['file_bytes'] / 2**20:.1f}" if measured else "",
                  *(f"{measured[key]:.1f}" if measured else "" for key in ("prefill_tokens_per_s", "decode_tokens_per_s")),
                  *(f"{measured[key]:.2f}" if measured else "" for key in ("prefill_speedup", "decode_speedup", "ideal_speedup"))]
        lines.append("| " + " | ".join(cells) + " |")
    settings = report["measured"]
    return "\n".join(lines) + f"\n\n{report['runtime']}, {settings['threads']} threads, {settings['turns']} turns.\n"
