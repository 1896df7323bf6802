"""Straightforward (slow, memory-hungry) reference implementations the scoring tests compare against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layerprune.models.loading import LoadedModel


@dataclass
class Rows:
    """Calibration rows in the data contract's shape."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


# Sliding-window masks (Gemma, Mistral) overflow to NaN on padded rows in float64 (a transformers quirk that
# layerprune reports as NumericalError), and Cohere's LayerNorm computes in float32 whatever the model's dtype
# (so a float64 model is only float32-exact), so those families are compared in float32.
EXACT_DTYPE = {"gemma2": torch.float32, "gemma3": torch.float32, "mistral": torch.float32, "cohere": torch.float32}


def exact_dtype(family: str) -> torch.dtype:
    return EXACT_DTYPE.get(family, torch.float64)


def tolerance(family: str) -> float:
    """Relative tolerance of a comparison with a reference computed in ``exact_dtype(family)``."""
    return 1e-9 if exact_dtype(family) == torch.float64 else 2e-5


def rows_with_padding(seed: int = 0) -> Rows:
    """Five rows of 16 tokens, three of them right-padded to different lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (5, 16), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in ((1, 9), (3, 12), (4, 5)):
        mask[row, length:] = 0
        ids[row, length:] = 256
    return Rows(ids, mask)


def all_layer_states(loaded: LoadedModel, rows: Rows) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's full input and output (the stacks the real code must never keep)."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        ins.append(args[0] if args else kwargs["hidden_states"])
        outs.append(output[0] if isinstance(output, tuple) else output)

    layers = loaded.adapter.decoder_layers(loaded.model)
    handles = [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        loaded.model(rows.input_ids, attention_mask=rows.attention_mask)
    for handle in handles:
        handle.remove()
    return ins, outs


def per_pair_means(ins: list[torch.Tensor], outs: list[torch.Tensor], where: torch.Tensor
                   ) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """Mean cos and mean arccos/pi over the ``where`` tokens, for every pair (i, j), i <= j."""
    cosine, angle = {}, {}
    for i in range(len(ins)):
        for j in range(i, len(outs)):
            cos = torch.nn.functional.cosine_similarity(ins[i].double(), outs[j].double(), dim=-1)[where]
            cosine[(i, j)] = float(cos.mean())
            angle[(i, j)] = float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())
    return cosine, angle


def masked_nll_sum(model: nn.Module, rows: Rows, grad: bool = False) -> torch.Tensor | float:
    """Summed next-token NLL over real targets from the model's full forward and full logits."""
    with torch.set_grad_enabled(grad):
        logits = model(rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = rows.input_ids[:, 1:].masked_fill((rows.attention_mask[:, 1:] * rows.attention_mask[:, :-1]) == 0,
                                                   -100)
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  reduction="sum", ignore_index=-100)
    return total if grad else float(total)
