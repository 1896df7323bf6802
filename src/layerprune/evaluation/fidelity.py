"""Fidelity: how close a pruned model's next-token distributions stay to its original's.

Perplexity and task accuracy ask how good a model is; a cut that keeps them may still say other
things than the original (the generative-reasoning losses of arXiv 2602.01997). The direct measure of
what a cut loses is its distance from the original, token by token: the KL divergence
KL(original || candidate) of the next-token distributions, which EvoPress ranks cuts by, and the
share of positions where both models' most likely next token agree (top-1 agreement).

This module holds the primitives, on logits (a search that scores many cuts against one stored pass
of the original keeps it in top-k form instead: :mod:`layerprune.searching.fitness`):

* :func:`token_kl` / :func:`token_agreement`: per position, from two models' logits;
* :func:`window_fidelity`: per window, the sums the bootstrap resamples;
* :func:`fidelity`: every candidate against one reference on perplexity's windows, with 95%
  bootstrap intervals over windows (``evaluation.intervals.ratio_interval``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerprune.errors import UsageError
from layerprune.evaluation.intervals import ratio_interval
from layerprune.evaluation.perplexity import dataset_stream, first_target, window_batches
from layerprune.progress import Progress


def token_kl(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) in nats at every position (``[..., vocab]`` -> ``[...]``), in float32.

    The direction is the original's: the expectation is over what the original would say, so a
    candidate is charged most for doubting the original's likely tokens (EvoPress's choice)."""
    if reference_logits.shape != candidate_logits.shape:
        raise UsageError(f"cannot compare next-token distributions of shapes {tuple(reference_logits.shape)} and "
                         f"{tuple(candidate_logits.shape)}: the models must share a tokenizer and vocabulary")
    reference = F.log_softmax(reference_logits.float(), dim=-1)
    candidate = F.log_softmax(candidate_logits.float(), dim=-1)
    return F.kl_div(candidate, reference, log_target=True, reduction="none").sum(dim=-1)


def token_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """Whether the two models' most likely next tokens are the same, at every position (bool)."""
    return reference_logits.argmax(dim=-1) == candidate_logits.argmax(dim=-1)


def window_fidelity(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per window (row of ``[windows, positions, vocab]`` logits at the predicted positions), the
    summed KL and the number of positions whose top-1 tokens agree: the totals a per-token mean and its
    bootstrap over windows are made of. One row at a time keeps a single ``[positions, vocab]``
    softmax in memory (a batch of 49k-word distributions is gigabytes)."""
    kl, agreed = [], []
    for reference, candidate in zip(reference_logits, candidate_logits):
        kl.append(float(token_kl(reference, candidate).double().sum()))
        agreed.append(int(token_agreement(reference, candidate).sum()))
    return kl, agreed


@dataclass(frozen=True)
class FidelityResult:
    """Mean KL(original || model) in nats per predicted token and the share of top-1 agreement,
    each with a 95% bootstrap interval over windows, and the tokens compared (perplexity's count)."""

    kl: float
    kl_ci95: tuple[float, float]
    top1_agreement: float
    top1_agreement_ci95: tuple[float, float]
    tokens: int

    @classmethod
    def of_windows(cls, window_kl: Sequence[float], window_agreed: Sequence[int],
                   window_tokens: Sequence[int]) -> FidelityResult:
        """The means over all tokens of the per-window sums, and their intervals over windows."""
        tokens = sum(window_tokens)
        kl_low, kl_high = ratio_interval(window_kl, window_tokens)
        agree_low, agree_high = ratio_interval(window_agreed, window_tokens)
        return cls(math.fsum(window_kl) / tokens, (kl_low, kl_high), sum(window_agreed) / tokens,
                   (agree_low, agree_high), tokens)

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {"kl": self.kl, "kl_ci95": list(self.kl_ci95), "top1_agreement": self.top1_agreement,
                "top1_agreement_ci95": list(self.top1_agreement_ci95), "tokens": self.tokens}


def _predicting_logits(model: PreTrainedModel, batch: torch.Tensor, first: int) -> torch.Tensor:
    """The logits at the positions that predict a window's targets (perplexity's positions)."""
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device), use_cache=False).logits[:, first - 1:-1].float().cpu()


@torch.no_grad()
def fidelity(reference: PreTrainedModel, candidates: Mapping[str, PreTrainedModel], token_ids: torch.Tensor,
             seq_len: int, *, batch_size: int = 4, max_windows: int | None = None,
             prefix: Sequence[int] = ()) -> dict[str, FidelityResult]:
    """Every candidate's fidelity to ``reference`` on ``token_ids`` cut into perplexity's windows
    (the same windows and predicted tokens as :func:`~layerprune.evaluation.perplexity.perplexity`).

    The reference runs once per batch and every candidate beside it, so no distribution is stored
    and the original is not run once per candidate."""
    first = first_target(prefix)
    sums: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name in candidates}
    window_tokens: list[int] = []
    batches = window_batches(token_ids, seq_len, batch_size=batch_size, max_windows=max_windows, prefix=prefix)
    with Progress("fidelity", sum(batch.shape[0] for batch in batches), unit="windows") as compared:
        for batch in batches:
            reference_logits = _predicting_logits(reference, batch, first)
            window_tokens += [reference_logits.shape[1]] * reference_logits.shape[0]
            for name, model in candidates.items():
                kl, agreed = window_fidelity(reference_logits, _predicting_logits(model, batch, first))
                sums[name][0].extend(kl)
                sums[name][1].extend(agreed)
            compared.update(batch.shape[0])
    return {name: FidelityResult.of_windows(kl, agreed, window_tokens) for name, (kl, agreed) in sums.items()}


def dataset_fidelity(reference: PreTrainedModel, candidates: Mapping[str, PreTrainedModel],
                     tokenizer: PreTrainedTokenizerBase, name: str, seq_len: int, *, batch_size: int = 4,
                     max_windows: int | None = None) -> dict[str, FidelityResult]:
    """:func:`fidelity` on the standard split of the named perplexity data set (or a local file)."""
    stream, prefix = dataset_stream(tokenizer, name)
    return fidelity(reference, candidates, stream, seq_len, batch_size=batch_size, max_windows=max_windows,
                    prefix=prefix)
