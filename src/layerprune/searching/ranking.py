"""Ranking candidates by perplexity on held-out text, dropping the clearly worse ones early.

The held-out text is never what the metrics were scored on or the repairs fitted to: for a named
source (``wiki-sample``, a hub data set) it is another split of the same source (the data layer
splits by document: ``validation``, or ``test`` when calibrating on validation); a local file has
no split, so the caller names a second file. It is cut into non-overlapping windows by the
standard perplexity protocol (:func:`layerprune.evaluation.perplexity.windows`), the same first
windows for every candidate.

Early dropping (:class:`DropRule`): a candidate is scored batch by batch; once it has seen at least
``after`` windows, it is dropped as soon as its running perplexity exceeds ``factor`` times the
best *final* perplexity so far. Its running figure is then recorded as a lower bound, never as its
perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from layerprune.errors import UsageError
from layerprune.evaluation.perplexity import windows


@dataclass(frozen=True)
class DropRule:
    """Drop a candidate once, after ``after`` windows or more, its running perplexity exceeds
    ``factor`` x the best final perplexity so far (``factor`` <= 0 never drops)."""

    after: int = 4
    factor: float = 1.5

    def drops(self, running_ppl: float, windows_seen: int, best_ppl: float | None) -> bool:
        return (self.factor > 0 and best_ppl is not None and windows_seen >= self.after
                and running_ppl > self.factor * best_ppl)


@dataclass(frozen=True)
class Ranked:
    """A candidate's held-out result: its perplexity (a lower bound when ``dropped``) over ``tokens``."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    dropped: bool


def rank(batches: Iterable[tuple[float, int, int]], rule: DropRule, best_ppl: float | None) -> Ranked:
    """Sum the ``(nll_sum, tokens, windows)`` of each batch until they end or ``rule`` drops the candidate.

    ``batches`` is lazy (:func:`window_losses`), so a dropped candidate's remaining windows never run.
    """
    nll_sum, tokens, windows_seen = 0.0, 0, 0
    for batch_nll, batch_tokens, batch_windows in batches:
        nll_sum, tokens, windows_seen = nll_sum + batch_nll, tokens + batch_tokens, windows_seen + batch_windows
        running = math.exp(nll_sum / tokens)
        if rule.drops(running, windows_seen, best_ppl):
            return Ranked(running, nll_sum / tokens, tokens, windows_seen, dropped=True)
    if not tokens:
        raise UsageError("the held-out text gave no window to score; use more held-out text or a shorter "
                         "calibration seq_len")
    return Ranked(math.exp(nll_sum / tokens), nll_sum / tokens, tokens, windows_seen, dropped=False)


def held_out_windows(stream: torch.Tensor, seq_len: int, prefix: list[int], count: int) -> list[torch.Tensor]:
    """The first ``count`` full windows of the held-out ``stream`` (a shorter tail is left out, so
    every batch has one shape and every candidate scores exactly the same tokens)."""

    full = [window for window in windows(stream, seq_len, prefix) if window.numel() == seq_len][:count]
    if not full:
        raise UsageError(f"the held-out text holds no full window of {seq_len} tokens; lower the calibration seq_len "
                         "or give more held-out text")
    return full


@torch.no_grad()
def window_losses(model: PreTrainedModel, windows: list[torch.Tensor], batch_size: int,
                  first: int) -> Iterator[tuple[float, int, int]]:
    """Per batch of windows: the summed next-token NLL, the tokens predicted, the windows.

    ``first`` is the first position whose token is predicted (after the tokenizer's prefix), as in
    :func:`layerprune.evaluation.perplexity.perplexity`, whose numbers these reproduce.
    """
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        batch = torch.stack(windows[start:start + batch_size]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, first - 1:-1].float()
        targets = batch[:, first:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        yield nll, targets.numel(), batch.shape[0]
