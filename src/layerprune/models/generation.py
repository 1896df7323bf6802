"""Greedy continuations of many prompts, batched without padding.

Generation agreement compares what two models say after the same prompts, and self-generated
healing data is what the original says after them; both need greedy (deterministic) continuations
of many prompts. Prompts of equal length run in one batch and none is padded: left padding shifts a
model's positions and can change its greedy choices, which would count as a disagreement the cut did
not cause. Templated prompts differ in length and simply form more batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def greedy_continuations(model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         eos_token_id: int | None, *, batch_size: int = 8) -> list[list[int]]:
    """Each prompt's greedy continuation of up to ``max_new_tokens`` tokens (prompt excluded), ended
    after the first ``eos_token_id`` (kept: ending there is part of what the model said; ``None``:
    the model's own end token, if its generation config names one)."""
    device = next(model.parameters()).device
    end = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    end = end[0] if isinstance(end, list) else end  # a config may list several; generate pads with the first
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    continuations: list[list[int]] = [[] for _ in prompts]
    for length, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chosen = indices[start:start + batch_size]
            ids = torch.tensor([list(prompts[i]) for i in chosen], device=device)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, temperature=None, top_p=None, top_k=None,
                                    eos_token_id=eos_token_id, pad_token_id=end)
            for index, row in zip(chosen, output[:, length:].tolist()):
                continuations[index] = row[:row.index(end) + 1] if end in row else row
    return continuations
