"""The fitness an evolutionary search minimises: how far a cut's next-token predictions are from the original's.

``kl``: the mean KL(original || cut) per scored position of the fitness rows (calibration rows);
``ppl``: the cut's mean next-token NLL there (its log-perplexity). Both are sums of non-negative
per-position terms, so a partial sum over the first batches never falls: a candidate whose partial
sum already exceeds a rival's total cannot beat it, which makes early stopping exact
(:mod:`.evolution`).

What is computed once, for every candidate (:class:`CachedOriginal`):

- the original's hidden state at every layer boundary with each layer's extra arguments
  (:func:`layerprune.scoring.forward.record_pass`, the machinery ``ppl`` scoring restarts from), so a
  cut whose first removed layer is ``i`` starts its forward at layer ``i``: layers ``0..i-1`` are the
  original's and their output is the cached input of layer ``i``;
- the original's next-token distribution at each scored position, kept as its ``k`` largest
  log-probabilities and the tail mass (:class:`TopK`): ``k=64`` of SmolLM2's 49,152 is 0.13% of the
  full distribution.

The error the top-k form adds to KL (:func:`kl_top_k`): the tail is scored as one bucket, i.e. the
KL of the coarse-grained distributions, which by the log-sum inequality is never more than the exact
KL. The exact minus the approximate KL at a position is ``p_tail * KL(P_tail || Q_tail)`` (the KL of
the two distributions inside the tail, each renormalised), so the approximation is a lower bound,
exact when the original puts no mass outside its top ``k``. :func:`tail_error_bound` bounds that
error from what is stored: no tail token of the original has more probability than its k-th
largest, and the worst tail under that cap puts it on the cut's least likely tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from layerprune.data import CalibrationSet
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import split_units
from layerprune.scoring.forward import Head, RecordedPass, count_targets, lm_batches, record_pass, replay_from

TOP_K = 64
"""Log-probabilities of the original kept per position (and the tail mass)."""

FITNESSES = ("kl", "ppl")


@dataclass(frozen=True)
class TopK:
    """The original's next-token distribution at ``n`` positions: its ``k`` largest log-probabilities,
    their token ids, and the log of the mass outside them (``-inf`` when there is none)."""

    log_probs: torch.Tensor
    indices: torch.Tensor
    log_tail: torch.Tensor

    @classmethod
    def of(cls, log_probs: torch.Tensor, k: int = TOP_K) -> TopK:
        """The top-``k`` form of full log-probabilities ``[n, vocab]``."""
        top, indices = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
        return cls(top, indices, log_rest(log_probs, indices))


def log_rest(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the probability outside ``indices`` at each position, summed in log space (stable when
    the rest is tiny, where ``log(1 - sum)`` would cancel to ``-inf`` or worse)."""
    return log_probs.scatter(-1, indices, float("-inf")).logsumexp(dim=-1)


def kl_top_k(teacher: TopK, logits: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """Per position, KL(teacher || q) with the teacher's tail as one bucket: a lower bound of the
    exact KL (see the module docstring), from the candidate's ``logits`` ``[n, vocab]`` (float32 or
    better; its log-probabilities do as well, being logits shifted per position).

    ``in_place`` consumes ``logits`` (they become scratch). Why: on Gemma-3's 262,144-token vocabulary
    one fitness batch's logits are 2 GB, and a log-softmax plus a masked copy for the tail allocated as
    much again twice: the fitness spent longer there than in the LM head. This way the logits are the
    only large tensor. The cut's tail probability is summed directly (its top-k entries zeroed), never
    as one minus the top-k's, which cancels; it is floored at the dtype's smallest normal number, where
    a tail that underflows gives a huge KL rather than an infinite one."""
    top_logits = logits.gather(-1, teacher.indices)
    peak = logits.amax(dim=-1, keepdim=True)
    scratch = logits if in_place else logits.clone()
    relative = scratch.sub_(peak).exp_()  # exp(logit - peak): at most 1, so no overflow
    log_total = relative.sum(dim=-1).log()
    tail_sum = relative.scatter_(-1, teacher.indices, 0.0).sum(dim=-1)
    log_q_tail = tail_sum.clamp(min=torch.finfo(tail_sum.dtype).tiny).log() - log_total
    log_q_top = top_logits - peak - log_total.unsqueeze(-1)
    top = teacher.log_probs.exp() * (teacher.log_probs - log_q_top)
    tail_mass = teacher.log_tail.exp()
    tail = torch.where(tail_mass > 0, tail_mass * (teacher.log_tail - log_q_tail), torch.zeros_like(tail_mass))
    return top.sum(dim=-1) + tail


def exact_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per position, KL(p || q) from full log-probabilities (the reference the top-k form is held to)."""
    return torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), torch.zeros_like(log_p)).sum(dim=-1)


def tail_error_bound(teacher: TopK, log_q: torch.Tensor) -> torch.Tensor:
    """Per position, the most the exact KL can exceed :func:`kl_top_k`'s, given only what is stored.

    The error is ``p_tail * KL(P_tail || Q_tail)``. Inside the tail no token of the original has more
    than ``c = p_k / p_tail`` of the tail's mass (``p_k`` its k-th largest probability); over
    distributions so capped the KL is convex, so its maximum is at a vertex: mass ``c`` on each of the
    ``floor(1/c)`` tokens the cut finds least likely and the rest on the next one (weights
    ``min(c, max(0, 1 - i c))`` against the cut's tail log-probabilities sorted ascending).
    """
    tail_mass = teacher.log_tail.exp()
    cap = (teacher.log_probs.min(dim=-1).values - teacher.log_tail).exp().clamp(max=1.0)
    log_q_tail = log_q.scatter(-1, teacher.indices, float("inf"))  # the top-k sort last, weight 0
    ascending = (log_q_tail - log_rest(log_q, teacher.indices)[:, None]).sort(dim=-1).values
    rank = torch.arange(ascending.shape[-1], dtype=ascending.dtype, device=ascending.device)
    weights = torch.minimum(cap[:, None], (1 - rank * cap[:, None]).clamp(min=0))
    worst = torch.special.xlogy(weights, weights) - torch.where(weights > 0, weights * ascending,
                                                                 torch.zeros_like(weights))
    return torch.where(tail_mass > 0, tail_mass * worst.sum(dim=-1), torch.zeros_like(tail_mass))


@dataclass
class FitnessBatch:
    """One batch of fitness rows as the original ran it (every layer's input and extra arguments),
    the scored positions, their next tokens, and the original's distribution there (``kl``)."""

    recorded: RecordedPass
    where: torch.Tensor
    targets: torch.Tensor
    teacher: TopK | None
    tokens: int
    """Real tokens in the batch (each forwarded once per candidate evaluated on it)."""

    @property
    def positions(self) -> int:
        return int(self.targets.numel())


@dataclass(frozen=True)
class BatchScore:
    """A candidate on one batch: its summed per-position fitness, the positions, and the work done in
    layer evaluations of one token (``layer_tokens``) against a full forward of the cut (``full_layer_tokens``)."""

    total: float
    positions: int
    tokens: int
    layer_tokens: int
    full_layer_tokens: int


class CachedOriginal:
    """The original model on the fitness rows, run once: a cut's fitness on a batch then costs only
    the layers from its first removed unit on, and the head (see the module docstring).

    A unit is a whole layer (its index) or a branch (``attn.i``, ``mlp.i``): the batches' boundaries
    are the layer inputs, so a cut whose first removed unit is a branch of layer ``i`` restarts at
    layer ``i``, which runs with that branch zeroed (:func:`~layerprune.models.sublayers.branch_zeroed`).
    """

    def __init__(self, loaded: LoadedModel, rows: CalibrationSet, batch_size: int, fitness: str,
                 top_k: int = TOP_K) -> None:
        self.layers: nn.ModuleList = loaded.adapter.decoder_layers(loaded.model)
        self.adapter = loaded.adapter
        self.head = Head(loaded)
        self.fitness = fitness
        self.batches: list[FitnessBatch] = []
        count_targets(rows, f"the {fitness} fitness")  # refuses rows with nothing to predict
        with torch.inference_mode():
            for input_ids, attention_mask, where, targets in lm_batches(rows, batch_size, f"{fitness} fitness"):
                recorded = record_pass(loaded, self.layers, input_ids, attention_mask)
                teacher = None
                if fitness == "kl":
                    teacher = TopK.of(torch.log_softmax(self.logits(recorded.final, where, normed=True), dim=-1),
                                      top_k)
                self.batches.append(FitnessBatch(recorded, where, targets, teacher,
                                                 int(attention_mask.sum())))

    def logits(self, hidden: torch.Tensor, where: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """Next-token logits (float32 or better) at the positions ``where`` of ``hidden``."""
        logits = self.head.logits(hidden[:, :-1][where.to(hidden.device)], normed=normed)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def layers_run(self, removed: Iterable[Hashable]) -> int:
        """The layers a full forward of the cut runs (a layer with one branch left runs)."""
        return len(self.layers) - len(split_units(removed)[0])

    def score(self, index: int, removed: frozenset[Hashable]) -> BatchScore:
        """The cut without the units ``removed`` on batch ``index``: its forward restarts at the layer of
        the first removed unit from the original's cached input there."""
        batch = self.batches[index]
        whole, zeroed = split_units(removed)
        start = min(whole | zeroed.keys())
        with torch.inference_mode():
            hidden = replay_from(self.layers, batch.recorded, start, whole, zeroed, self.adapter)
            if batch.teacher is not None:
                total = float(kl_top_k(batch.teacher, self.logits(hidden, batch.where), in_place=True).sum())
            else:
                total = float(self.head.nll_sum(hidden, batch.where, batch.targets))
        kept = len(self.layers) - len(whole)
        run = kept - start  # the layers before the first removed unit's all are kept
        return BatchScore(total, batch.positions, batch.tokens, batch.tokens * run, batch.tokens * kept)
