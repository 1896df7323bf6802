"""lm-eval's Hugging Face model, computing the LM head only at the positions a request scores.

A loglikelihood request asks for the log-probability of a few continuation tokens after a long
context (one answer word after a 200-token story). lm-eval's ``HFLM`` computes logits and a
log-softmax over the whole vocabulary at every position of the batch and keeps the last few. For
Gemma-3 (a 262,144-word vocabulary on a 640-wide model) the head is most of the forward pass's
work and its batch of logits gigabytes of memory traffic. Transformers' ``logits_to_keep`` runs the
model's own head (softcapping and scaling included) on chosen positions only, so this scores the
same requests with the same model code and less work. The answers are ``HFLM``'s (tests compare
them with it and with a full forward pass), with one corner done right: lm-eval's one-token cache
scores only the last token of a request that shares its input with another split elsewhere (the
same tokens as context + answer at a different boundary); here every answer is scored in full.
Anything this does not cover (encoder-decoder models, ``batch_size="auto"``,
a model whose forward has no ``logits_to_keep``) goes to ``HFLM`` unchanged.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str] | None, list[int], list[int]]
"""lm-eval's tokenized request: (the request's strings or None, context tokens, continuation tokens)."""


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (a wrapper such as PEFT's passes it on)."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "logits_to_keep" in inspect.signature(forward).parameters


class ScoredPositionsLM(HFLM):
    """``HFLM`` whose loglikelihood requests compute logits only where a continuation is scored."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not isinstance(self.batch_size, int) or not accepts_logits_to_keep(self.model):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # Requests whose inputs are equal (the answers to one prompt that differ only in their last
        # token) share one forward pass. lm-eval's rule for an input over the model's length: keep
        # its last max_length + 1 tokens, the last of which is only a target.
        askers: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (_, context, continuation) in enumerate(requests):
            askers[tuple((context + continuation)[-(self.max_length + 1):][:-1])].append(index)
        # longest first, as lm-eval orders them: padding stays short and memory peaks at once
        inputs = sorted(askers, key=lambda tokens: (-len(tokens), tokens))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests")
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size]
            scored = [max(len(requests[i][2]) for i in askers[tokens]) for tokens in batch]
            for tokens, log_probs in zip(batch, self._scored_log_probs(batch, scored)):
                for index in askers[tokens]:
                    answers[index] = _answer(log_probs, requests[index][2])
                    request_strings = requests[index][0]
                    if request_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", request_strings, answers[index])
                    progress.update(1)
        progress.close()
        return answers  # type: ignore[return-value]

    def _scored_log_probs(self, batch: Sequence[tuple[int, ...]], scored: Sequence[int]) -> list[torch.Tensor]:
        """For each row, the log-probabilities at its own last ``scored[row]`` positions
        (``[scored[row], vocab]``): the head runs once on the union of the batch's scored positions,
        the log-softmax only on each row's own."""
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: a causal model never reads it
        wanted = []
        for row, tokens in enumerate(batch):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            wanted.append(torch.arange(len(tokens) - scored[row], len(tokens)))
        positions = torch.unique(torch.cat(wanted))  # sorted
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self.model(ids.to(self.device), logits_to_keep=positions.to(self.device)).logits
        return [F.log_softmax(logits[row, torch.searchsorted(positions, rows).to(self.device)], dim=-1,
                              dtype=self.softmax_dtype) for row, rows in enumerate(wanted)]


def _answer(log_probs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """(summed log-probability of ``continuation``, whether greedy decoding gives it exactly), read
    from the last ``len(continuation)`` of a row's scored positions."""
    rows = log_probs[-len(continuation):]
    targets = torch.tensor(continuation, device=rows.device)
    chosen = rows.gather(1, targets.unsqueeze(1)).squeeze(1)
    return float(chosen.sum()), bool((rows.argmax(dim=-1) == targets).all())
