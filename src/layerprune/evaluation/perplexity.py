"""Perplexity by the standard protocol: concatenate a split, cut it into non-overlapping windows.

Every paper on depth pruning (ShortGPT, LLM-Streamline, SLEB, ...) reports perplexity this way, so
our numbers are comparable with theirs only if we do exactly the same: the whole split is tokenized
as one stream, cut into consecutive windows of ``seq_len`` tokens without overlap, and every token
but the first of each window is predicted from the tokens before it *in its window*. The result is
the mean negative log-likelihood over all predicted tokens, its exponential, and the token count
(so that two runs can be checked to have scored the same text).

A tokenizer that starts every text with special tokens (Gemma's and Llama's ``<bos>``) gets them
at the start of every window, as lm-eval's rolling windows do; the window then holds that many
fewer text tokens, and every text token in it is predicted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerprune import data
from layerprune.data.calibration import text_per_window
from layerprune.errors import OptionError, UsageError
from layerprune.evaluation.intervals import perplexity_interval
from layerprune.progress import Progress


@dataclass(frozen=True)
class PerplexitySource:
    """Where a perplexity data set comes from in the data layer, and which split is the standard one."""

    source: str
    split: str
    text_field: str | None = None
    online: bool = False


# Short names users type; anything else is passed to the data layer as a file path or hub name.
PPL_SOURCES: dict[str, PerplexitySource] = {
    "wiki-sample": PerplexitySource("wiki-sample", "test"),
    "news-sample": PerplexitySource("news-sample", "test"),
    "wikitext2": PerplexitySource("wikitext2", "test", online=True),
    "ptb": PerplexitySource("ptb", "test", online=True),
    "c4": PerplexitySource("c4", "validation", online=True),
}


@dataclass(frozen=True)
class PerplexityResult:
    """Mean NLL (nats per token), its exponential, how many tokens were predicted, and a 95%
    bootstrap interval of the perplexity over windows (``intervals.perplexity_interval``)."""

    nll: float
    ppl: float
    tokens: int
    ci95: tuple[float, float]

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def resolve_ppl_source(name: str) -> PerplexitySource:
    """A known short name, or an existing local file; fails fast with the list of names otherwise."""
    if name in PPL_SOURCES:
        return PPL_SOURCES[name]
    path = Path(name).expanduser()
    if path.is_file():
        return PerplexitySource(str(path), "test")
    raise UsageError(
        f"unknown perplexity data {name!r}; use one of {', '.join(PPL_SOURCES)} or the path of an existing text file"
    )


def check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise UsageError(f"seq_len {seq_len} is too short: a window needs at least 2 tokens; use a seq_len such as 512")


def windows(token_ids: torch.Tensor, seq_len: int, prefix: Sequence[int] = ()) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens, each starting with ``prefix``; a
    trailing remainder is a window too if it holds a token to predict."""
    check_seq_len(seq_len)
    if token_ids.dim() != 1:
        raise UsageError(f"perplexity needs one 1-D token stream, got shape {tuple(token_ids.shape)}")
    start = torch.tensor(list(prefix), dtype=token_ids.dtype)
    pieces = torch.split(token_ids, text_per_window(seq_len, prefix))
    return [torch.cat([start, piece]) for piece in pieces if piece.numel() + len(prefix) >= 2]


def window_batches(token_ids: torch.Tensor, seq_len: int, *, batch_size: int = 4, max_windows: int | None = None,
                   prefix: Sequence[int] = ()) -> list[torch.Tensor]:
    """The windows of the protocol (see the module docstring) in batches of equal length: what
    perplexity scores, and what fidelity compares two models on, so both measure the same tokens.
    Each window's predicted tokens are its positions from :func:`first_target` on. Text too short
    for one window is refused."""
    body = seq_len - len(prefix)
    if token_ids.numel() < 2:
        raise UsageError("the data has fewer than 2 tokens; perplexity needs text to score")
    if token_ids.numel() < body:  # a perplexity of a fraction of one window says little and has no interval
        raise OptionError.about("seq_len", f"{seq_len} is longer than the whole text ({token_ids.numel()} tokens"
                                           f"{' after the start token(s)' if prefix else ''}); use at most "
                                           f"{token_ids.numel() + len(prefix)}, or more text")
    chunks = windows(token_ids, seq_len, prefix)[:max_windows]
    # Equal-length windows are batched; the shorter last window (if any) runs on its own.
    groups: dict[int, list[torch.Tensor]] = {}
    for chunk in chunks:
        groups.setdefault(chunk.numel(), []).append(chunk)
    return [torch.stack(same_length[start:start + batch_size])
            for same_length in groups.values() for start in range(0, len(same_length), batch_size)]


def first_target(prefix: Sequence[int]) -> int:
    """The first position of a window whose token is predicted (a prefix is never a target)."""
    return max(len(prefix), 1)


@torch.no_grad()
def perplexity(model: PreTrainedModel, token_ids: torch.Tensor, seq_len: int, *, batch_size: int = 4,
               max_windows: int | None = None, prefix: Sequence[int] = ()) -> PerplexityResult:
    """Score ``token_ids`` (the whole split as one stream) by the non-overlapping-window protocol,
    every window starting with ``prefix`` (see the module docstring).

    ``max_windows`` limits the text scored (the first windows), for quick looks; the token count
    in the result says how much was scored.
    """
    first = first_target(prefix)
    device = next(model.parameters()).device
    window_nll: list[float] = []
    window_tokens: list[int] = []
    batches = window_batches(token_ids, seq_len, batch_size=batch_size, max_windows=max_windows, prefix=prefix)
    with Progress("perplexity", sum(batch.shape[0] for batch in batches), unit="windows") as scored:
        for batch in batches:
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, first - 1:-1].float()
            targets = batch[:, first:]
            token_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            window_nll += token_nll.view(targets.shape).double().sum(dim=1).tolist()
            window_tokens += [targets.shape[1]] * targets.shape[0]
            scored.update(targets.shape[0])
    total_tokens = sum(window_tokens)
    nll = math.fsum(window_nll) / total_tokens
    low, high = perplexity_interval(window_nll, window_tokens)
    return PerplexityResult(nll=nll, ppl=math.exp(nll), tokens=total_tokens, ci95=(low, high))


def dataset_stream(tokenizer: PreTrainedTokenizerBase, name: str) -> tuple[torch.Tensor, list[int]]:
    """The standard split of the named data set (or a local file) as one token stream, and the start
    tokens every window begins with."""
    spec = resolve_ppl_source(name)
    return (data.token_stream(tokenizer, spec.source, split=spec.split, text_field=spec.text_field),
            data.text_prefix(tokenizer))


def dataset_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, seq_len: int, *,
                       batch_size: int = 4, max_windows: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on the standard split of the named data set (or a local file)."""
    stream, prefix = dataset_stream(tokenizer, name)
    return perplexity(model, stream, seq_len, batch_size=batch_size, max_windows=max_windows, prefix=prefix)
