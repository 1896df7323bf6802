"""Folding a map into weights the model already has, so a repair adds no parameter.

Every fold here is exact algebra on one module: after it, the module's output equals its old
output times ``T`` (a matrix acting on row vectors) or times a per-channel factor. The algebra
is done in float64 and the result cast back to the weight's dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from layerprune.errors import UsageError

NORM_KINDS = ("rms", "rms_one_plus", "layer")


def _assign(parameter: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value.to(parameter.dtype))


def fold_linear_map(projection: nn.Module, transform: torch.Tensor) -> None:
    """Make ``projection``'s output ``y`` become ``y @ transform``.

    ``nn.Linear`` computes ``x Wᵀ + b``, so ``W ← Tᵀ W`` and ``b ← Tᵀ b``; GPT-2's ``Conv1D``
    computes ``x W + b`` with ``W`` stored ``[in, out]``, so ``W ← W T`` and ``b ← b T``.
    """
    transform = transform.to(torch.float64)
    weight = projection.weight.detach().to(device=transform.device, dtype=torch.float64)
    if isinstance(projection, Conv1D):
        _assign(projection.weight, weight @ transform)
    elif isinstance(projection, nn.Linear):
        _assign(projection.weight, transform.T @ weight)
    else:
        raise UsageError(f"cannot fold a linear map into a {type(projection).__name__}; replace-linear needs the "
                         "MLP output to be a linear projection")
    if projection.bias is not None:
        _assign(projection.bias, projection.bias.detach().to(transform.device, torch.float64) @ transform)


def scale_projection(projection: nn.Module, factor: torch.Tensor | float) -> None:
    """Multiply ``projection``'s output by ``factor`` (a scalar or one value per output channel)."""
    factor = torch.as_tensor(factor, dtype=torch.float64, device=projection.weight.device)
    if isinstance(projection, (Conv1D, nn.Linear)):
        weight = projection.weight.detach().to(torch.float64)
        scaled = weight * factor if isinstance(projection, Conv1D) else weight * factor.reshape(-1, 1)
        _assign(projection.weight, scaled)
    else:
        raise UsageError(f"cannot rescale the output of a {type(projection).__name__}; a linear projection is needed")
    if projection.bias is not None:
        _assign(projection.bias, projection.bias.detach().to(torch.float64) * factor)


def scale_norm(norm: nn.Module, factor: torch.Tensor | float, norm_kind: str) -> None:
    """Multiply a norm's output by ``factor`` through its affine weight (and bias).

    Gemma's norms compute ``x̂ (1 + w)``, so their weight becomes ``(1 + w) f - 1``; the others
    compute ``x̂ w (+ b)`` and scale ``w`` (and ``b``) by ``f``.
    """
    if norm_kind not in NORM_KINDS:
        raise UsageError(f"unknown norm kind {norm_kind!r}; expected one of: {', '.join(NORM_KINDS)}")
    factor = torch.as_tensor(factor, dtype=torch.float64, device=norm.weight.device)
    weight = norm.weight.detach().to(torch.float64)
    _assign(norm.weight, (1 + weight) * factor - 1 if norm_kind == "rms_one_plus" else weight * factor)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        _assign(bias, bias.detach().to(torch.float64) * factor)
