"""Streaming accumulators for similarity between layer inputs and outputs.

Block Influence (ShortGPT), the angular distance of Gromov et al. and LLM-Streamline's block cosine
are all means over tokens of ``cos(x_in_i, x_out_j)`` (or its arccos) for pairs of layers
``i <= j``. Keeping every hidden state of every token to average at the end would grow with
tokens x layers; instead :class:`SimilarityAccumulator` keeps, for every pair, only float64 sums
and a token count. Its state is a few ``[L, L]`` tensors, so partial results from batches,
processes or layer-by-layer streaming are combined with :meth:`SimilarityAccumulator.merge` (or an
all-reduce of :meth:`SimilarityAccumulator.state_dict`) in any order, with the same result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_STATE_KEYS = ("cos_sum", "angle_sum", "count")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit length along its last axis, in float32 or better (float64 stays).

    Half-precision hidden states are upcast first, so the cosines are exact to float32 whatever
    dtype the model runs in.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


class SimilarityAccumulator:
    """Running sums of ``cos`` and ``arccos/pi`` between layer inputs and outputs, per pair.

    Entry ``[i, j]`` (``i <= j``) describes the block of layers ``i..j``: the input of layer ``i``
    against the output of layer ``j``. Feed it cosines with :meth:`add_cosines` (cheapest, when the
    caller already holds unit vectors) or raw hidden states with :meth:`add`.
    """

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.cos_sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.angle_sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.count = torch.zeros(num_layers, num_layers, dtype=torch.int64)

    def add_cosines(self, starts: Sequence[int], end: int, cosines: torch.Tensor) -> None:
        """Add per-token cosines ``cosines[k, n]`` between the input of layer ``starts[k]`` and
        the output of layer ``end``, for ``n`` tokens (already restricted to the scored ones)."""
        if cosines.dim() != 2 or cosines.shape[0] != len(starts):
            raise ValueError(f"cosines must be [len(starts)={len(starts)}, tokens], got {tuple(cosines.shape)}")
        if any(not 0 <= s <= end < self.num_layers for s in starts):
            raise ValueError(f"pairs ({list(starts)}, {end}) must satisfy 0 <= start <= end < {self.num_layers}")
        cosines = cosines.to(torch.float64).clamp(-1.0, 1.0)
        rows = torch.as_tensor(list(starts), dtype=torch.long)
        self.cos_sum[rows, end] += cosines.sum(dim=1).cpu()
        self.angle_sum[rows, end] += (torch.arccos(cosines) / math.pi).sum(dim=1).cpu()
        self.count[rows, end] += cosines.shape[1]

    def add(self, start: int, end: int, x_in: torch.Tensor, x_out: torch.Tensor,
            mask: torch.Tensor | None = None) -> None:
        """Add one pair from hidden states ``[..., hidden]``; ``mask`` (``[...]``, bool or 0/1)
        picks the tokens that count, so padding never enters the mean."""
        if mask is not None:
            keep = mask.to(torch.bool)
            x_in, x_out = x_in[keep], x_out[keep]
        cosines = (unit_rows(x_in) * unit_rows(x_out)).sum(dim=-1).reshape(1, -1)
        self.add_cosines([start], end, cosines)

    def merge(self, other: SimilarityAccumulator) -> SimilarityAccumulator:
        """Add ``other``'s sums into this one (batches, processes or shards of the same model)."""
        if other.num_layers != self.num_layers:
            raise ValueError(f"cannot merge accumulators of {other.num_layers} and {self.num_layers} layers")
        for key in _STATE_KEYS:
            getattr(self, key).add_(getattr(other, key))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sums and counts; summing these element-wise across workers is a valid reduction."""
        return {key: getattr(self, key).clone() for key in _STATE_KEYS}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SimilarityAccumulator:
        accumulator = cls(int(state["count"].shape[0]))
        for key in _STATE_KEYS:
            getattr(accumulator, key).copy_(state[key])
        return accumulator

    def _mean(self, sums: torch.Tensor, start: int, end: int) -> float:
        count = int(self.count[start, end])
        if count == 0:
            raise ValueError(f"no tokens were accumulated for layers {start}..{end}")
        return float(sums[start, end]) / count

    def _table(self, sums: torch.Tensor) -> dict[int, list[float]]:
        size = self.num_layers
        return {n: [self._mean(sums, i, i + n - 1) for i in range(size - n + 1)] for n in range(1, size + 1)}

    def mean_cosine(self) -> dict[int, list[float]]:
        """``{n: [mean cos(x_in_i, x_out_{i+n-1}) for every start i]}`` (LLM-Streamline)."""
        return self._table(self.cos_sum)

    def angular_distance(self) -> dict[int, list[float]]:
        """``{n: [mean arccos(cos(x_in_i, x_out_{i+n-1}))/pi for every start i]}`` (Gromov et al.)."""
        return self._table(self.angle_sum)

    def block_influence(self) -> list[float]:
        """ShortGPT's BI_i = 1 - mean cos(x_in_i, x_out_i), one value per layer."""
        return [1.0 - self._mean(self.cos_sum, i, i) for i in range(self.num_layers)]
