"""Token windows for calibration, training and perplexity.

Three samplings, each a registered unit in :data:`SAMPLINGS`: ``random`` (seeded random windows
of the concatenated split, the default), ``contiguous`` (the first N non-overlapping windows) and
``documents`` (one right-padded window per document, the only one with padding). The text is
tokenized without special tokens; every
window then starts with the tokens the tokenizer puts before any text (:func:`text_prefix`), as
lm-eval's rolling windows do, because a model trained always to see its BOS first is far off
without it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from layerprune.data.rows import CalibrationSet
from layerprune.data.sources import load_texts, source_key
from layerprune.data.store import cached_tokens, tokenizer_fingerprint
from layerprune.errors import OptionError, UsageError, mention
from layerprune.options import Config, SEED_RANGE, option
from layerprune.registry import Registry

DOCUMENT_SEPARATOR = "\n\n"


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def text_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens ``tokenizer`` puts before any text by default: ``<bos>`` for Gemma and
    Llama, nothing for GPT-2 or SmolLM2. Gemma-3-270M's wiki perplexity is 142 on windows without
    its ``<bos>`` and 33 with it, so windows must start the way the model was trained."""
    marked = tokenizer("a", verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start:start + len(plain)] == plain:
            return list(marked[:start])
    return []


def token_stream(tokenizer: PreTrainedTokenizerBase, source: str | Path, split: str = "test",
                 text_field: str | None = None) -> torch.Tensor:
    """The whole split as one 1-D token tensor, for perplexity and window sampling.

    The documents are joined by a blank line and tokenized once, without special tokens: the
    standard perplexity protocol (``"\n\n".join`` of the rows), so numbers compare with papers.
    Tokenizing takes seconds on a large split, so the stream is cached per (tokenizer, source,
    split); an edited local file is tokenized again.
    """
    key = {"tokenizer": tokenizer_fingerprint(tokenizer), **source_key(source, split, text_field)}

    def build() -> torch.Tensor:
        text = DOCUMENT_SEPARATOR.join(load_texts(source, split, text_field))
        return torch.tensor(_tokenize(tokenizer, [text])[0], dtype=torch.long)

    stream = cached_tokens(key, build)
    if not stream.numel():
        raise UsageError(f"{source} ({split} split) holds no text; use other data")
    return stream


def text_per_window(seq_len: int, prefix: Sequence[int]) -> int:
    """Text tokens in a window of ``seq_len`` that starts with ``prefix``; refuses a window with none."""
    if len(prefix) >= seq_len:
        raise OptionError.about("seq_len", f"{seq_len} leaves no room for text after the tokenizer's {len(prefix)} "
                                           f"start token(s); use {len(prefix) + 1} or more")
    return seq_len - len(prefix)


@dataclass(frozen=True)
class WindowRequest:
    """What a sampling draws from and how many windows of what length, each starting with ``prefix``."""

    tokenizer: PreTrainedTokenizerBase
    source: str | Path
    split: str
    text_field: str | None
    samples: int
    seq_len: int
    seed: int
    prefix: list[int]


class Sampling(ABC):
    """One way to draw calibration windows: subclass, implement :meth:`draw`, register an instance
    in :data:`SAMPLINGS`. ``options_class`` declares its options (none so far: the seed is the
    calibration set's own)."""

    options_class: type | None = None

    @abstractmethod
    def draw(self, request: WindowRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, ``[samples, seq_len]``."""


class _StreamWindows(Sampling):
    """Windows cut from the split's one token stream, all full (no padding)."""

    def draw(self, request: WindowRequest) -> tuple[torch.Tensor, torch.Tensor]:
        body = text_per_window(request.seq_len, request.prefix)
        stream = token_stream(request.tokenizer, request.source, request.split, request.text_field)
        if stream.numel() < body:
            raise UsageError(f"{request.source} ({request.split} split) has {stream.numel()} tokens, fewer than "
                             f"{mention('seq_len')} {request.seq_len}; lower {mention('seq_len')} or use more data")
        texts = self.texts(stream, body, request)
        rows = torch.cat([torch.tensor(request.prefix, dtype=torch.long).expand(request.samples, -1), texts], dim=1)
        return rows, torch.ones_like(rows)

    @abstractmethod
    def texts(self, stream: torch.Tensor, body: int, request: WindowRequest) -> torch.Tensor:
        """``[samples, body]`` text tokens of the windows."""


class RandomWindows(_StreamWindows):
    """Seeded random offsets (overlaps allowed: a small corpus still yields many windows)."""

    def texts(self, stream: torch.Tensor, body: int, request: WindowRequest) -> torch.Tensor:
        generator = torch.Generator().manual_seed(request.seed)
        starts = torch.randint(0, stream.numel() - body + 1, (request.samples,), generator=generator)
        return torch.stack([stream[start:start + body] for start in starts.tolist()])


class ContiguousWindows(_StreamWindows):
    """The first non-overlapping windows of the split."""

    def texts(self, stream: torch.Tensor, body: int, request: WindowRequest) -> torch.Tensor:
        fit = stream.numel() // body
        if fit < request.samples:
            raise UsageError(f"{request.source} ({request.split} split) holds only {fit} non-overlapping windows of "
                             f"{request.seq_len} tokens, fewer than {mention('samples')} {request.samples}; lower {mention('samples')} or "
                             f"{mention('seq_len')}, or use random sampling")
        return stream[: request.samples * body].view(request.samples, body)


class DocumentWindows(Sampling):
    """``samples`` documents picked with the seed, each after the prefix, truncated to ``seq_len``
    and right-padded."""

    def draw(self, request: WindowRequest) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer, prefix, seq_len, samples = request.tokenizer, request.prefix, request.seq_len, request.samples
        documents = [prefix + ids[:seq_len - len(prefix)]
                     for ids in _tokenize(tokenizer, load_texts(request.source, request.split, request.text_field))
                     if ids]
        if len(documents) < samples:
            raise UsageError(f"{request.source} ({request.split} split) holds {len(documents)} documents, fewer than "
                             f"{mention('samples')} {samples} (documents sampling takes one window per document); lower "
                             f"{mention('samples')} or use random sampling")
        generator = torch.Generator().manual_seed(request.seed)
        order = torch.randperm(len(documents), generator=generator)[:samples].tolist()
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        input_ids = torch.full((samples, seq_len), pad, dtype=torch.long)
        attention_mask = torch.zeros((samples, seq_len), dtype=torch.long)
        for row, index in enumerate(order):
            document = torch.tensor(documents[index], dtype=torch.long)
            input_ids[row, : document.numel()] = document
            attention_mask[row, : document.numel()] = 1
        return input_ids, attention_mask


SAMPLINGS: Registry[Sampling] = Registry("sampling")
SAMPLINGS.register("random")(RandomWindows())
SAMPLINGS.register("contiguous")(ContiguousWindows())
SAMPLINGS.register("documents")(DocumentWindows())


class CalibrationConfig(Config):
    """Where the calibration windows come from and how many: the one declaration of these options.

    Scoring, a repair's statistics and a search's scoring all read their rows through it, so the
    Python API, a recipe's ``calibration`` section and the command line's data flags draw the same
    windows when nothing is given (64 random windows of 256 tokens of ``wiki-sample``: enough for
    stable layer statistics at a small model's cost), and every calibration is recorded alike.
    """

    unit = "calibration"

    source: str | Path = option("wiki-sample", "wiki-sample | news-sample (offline), a local text/JSON/JSONL/CSV "
                                "file, or a hub dataset name when online", flag="--data")
    split: str = option("train", "data split to draw from")
    text_field: str | None = option(None, "the field holding the text in a JSON/CSV/hub dataset")
    samples: int = option(64, "calibration rows", minimum=1)
    seq_len: int = option(256, "tokens per row (a token and its successor at least)", minimum=2)
    seed: int = option(0, "seed for sampling windows (on the command line also the random metric's)",
                       minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
    sampling: str = option("random", "random windows, contiguous windows from the start of the text, or one "
                           "padded window per document", choices=SAMPLINGS.names())

    def record(self) -> dict[str, Any]:
        """The calibration as ``layerprune.json`` and score reports record it (no unset text field)."""
        return {**self.model_dump(exclude_none=True), "source": str(self.source)}


DEFAULT_CALIBRATION = CalibrationConfig()


def check_context(seq_len: int, max_positions: int | None) -> None:
    """Refuse windows longer than the model's context (``max_positions``) before any text is read."""
    if max_positions is not None and seq_len > max_positions:
        raise OptionError.about("seq_len", f"{seq_len} is longer than the model's context of {max_positions} "
                                           f"tokens; use {max_positions} or less")


def check_window_memory(config: CalibrationConfig) -> None:
    """Refuse windows whose token ids alone (ids and mask, 8 bytes each) would take more than half of this
    machine's memory, before anything is allocated: ``samples`` of 10^12 asked the allocator for 8 TB."""
    needed = config.samples * config.seq_len * 16
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if needed > budget:
        config.refuse("samples", f"{config.samples:,} windows of {config.seq_len} tokens need {needed / 2**30:,.0f} GiB "
                                 f"for their ids alone, more than half this machine's memory; use at most "
                                 f"{budget // (config.seq_len * 16):,}")


def calibrate(tokenizer: PreTrainedTokenizerBase, config: CalibrationConfig = DEFAULT_CALIBRATION, *,
              max_positions: int | None = None) -> CalibrationSet:
    """Draw the windows ``config`` describes; the set records ``config`` (and the tokenizer's text
    prefix). ``max_positions`` (the model's context) refuses a too-long ``seq_len`` before anything is
    tokenized."""
    check_context(config.seq_len, max_positions)
    check_window_memory(config)
    prefix = text_prefix(tokenizer)
    text_per_window(config.seq_len, prefix)  # refuses a window with no room for text
    request = WindowRequest(tokenizer, config.source, config.split, config.text_field, config.samples,
                            config.seq_len, config.seed, prefix)
    input_ids, attention_mask = SAMPLINGS.get(config.sampling).draw(request)
    return CalibrationSet(input_ids, attention_mask, {**config.record(), **({"prefix": prefix} if prefix else {})})


def build_calibration(tokenizer: PreTrainedTokenizerBase, source: str | Path = DEFAULT_CALIBRATION.source, *,
                      split: str = DEFAULT_CALIBRATION.split, samples: int = DEFAULT_CALIBRATION.samples,
                      seq_len: int = DEFAULT_CALIBRATION.seq_len, seed: int = DEFAULT_CALIBRATION.seed,
                      sampling: str = DEFAULT_CALIBRATION.sampling, text_field: str | None = None,
                      max_positions: int | None = None) -> CalibrationSet:
    """Draw ``samples`` windows of ``seq_len`` tokens from ``split`` of ``source``: :func:`calibrate`
    with a :class:`CalibrationConfig` built from these keywords (whose defaults are the config's).

    ``random`` windows start at seeded offsets of the split's token stream (overlaps allowed: a
    small corpus still yields many windows); ``contiguous`` takes the first non-overlapping ones;
    ``documents`` gives one padded window per seeded-chosen document.
    """
    config = CalibrationConfig(source=source, split=split, samples=samples, seq_len=seq_len, seed=seed,
                               sampling=sampling, text_field=text_field)
    return calibrate(tokenizer, config, max_positions=max_positions)
