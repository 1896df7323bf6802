"""``replace-linear`` (ReplaceMe, NeurIPS 2025): one linear map stands in for a removed run.

For a removed run ``[a, b)`` the pruned model hands layer ``a-1``'s output, ``h_a - M + M``, to
the layers after the cut, which were trained on ``h_b``. ReplaceMe picks ``T`` so that
``(h_a - M) + M T ≈ h_b``, i.e. ``T = argmin ||M T - Y||²`` with ``Y = h_b - h_a + M``, solved
from the accumulated ``MᵀM`` and ``MᵀY``, and folds it into the MLP output projection
(``W ← Tᵀ W``): no parameter is added.

Gemma-2/3 normalise the MLP output after the projection, which a full ``T`` cannot pass through;
there a diagonal ``T`` (ReplaceMe's diagonal option) is folded into that norm's weight. The
``cosine`` solver continues from the least-squares ``T`` with Adam on ReplaceMe's cosine-distance
objective, on the run's real tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.options import Config, option
from layerprune.repair.base import REPAIRS, RepairMethod
from layerprune.repair.folds import fold_linear_map, scale_norm
from layerprune.repair.statistics import RunStatistics

SOLVERS = ("lstsq", "cosine")
COSINE_LR = 1e-4
COSINE_BATCH_TOKENS = 4096


class ReplaceLinearOptions(Config):
    """How ``replace-linear`` estimates its map."""

    unit = "replace-linear"

    ridge: float = option(0.0, "ridge added to MᵀM before solving (0 = ReplaceMe's plain least squares)", minimum=0.0)
    solver: str = option("lstsq", "lstsq: least squares; cosine: then Adam on ReplaceMe's cosine distance",
                         choices=SOLVERS)
    cosine_steps: int = option(300, "Adam steps of the cosine solver", minimum=1)


def solve_linear_map(gram: torch.Tensor, cross: torch.Tensor, ridge: float, *, diagonal: bool,
                     label: str) -> tuple[torch.Tensor, float, int]:
    """``T`` solving ``(MᵀM + αI) T = MᵀY`` (or its diagonal version), the system's condition
    number, and how many channels were dead (diagonal only).

    A full system whose smallest eigenvalue is within rounding of zero relative to its largest (the
    numerical-rank rule of ``matrix_rank``) is refused rather than solved into noise. A diagonal
    system is one 1x1 system per channel: a channel the branch never drives (zero on every token,
    e.g. a post-norm weight of 0) has no say in the loss whatever its factor, so it keeps factor 1
    (its weight unchanged) and is counted; only a branch dead in every channel is refused.
    """
    hidden = gram.shape[0]
    if diagonal:
        spectrum = gram.diagonal() + ridge
        largest = float(spectrum.max())
        live = spectrum > largest * hidden * torch.finfo(spectrum.dtype).eps
        if largest <= 0 or not bool(live.any()):
            raise UsageError(f"the MLP branch before the removed run {label} is zero on every calibration token; "
                             "use other calibration data, or repair this cut with --method rescale")
        factors = torch.where(live, cross.diagonal() / torch.where(live, spectrum, 1.0), 1.0)
        return torch.diag(factors), largest / float(spectrum[live].min()), int((~live).sum())
    spectrum = torch.linalg.eigvalsh(gram + ridge * torch.eye(hidden, dtype=gram.dtype, device=gram.device))
    largest, smallest = float(spectrum.max()), float(spectrum.min())
    if largest <= 0 or smallest <= largest * hidden * torch.finfo(spectrum.dtype).eps:
        raise UsageError(f"the least-squares system of the removed run {label} is singular (the calibration tokens do "
                         f"not span the {hidden} channels of the MLP output); use more or more varied calibration "
                         "data (--samples, --seq-len) or add a ridge (e.g. --ridge 1e-3)")
    system = gram + ridge * torch.eye(hidden, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(system, cross), largest / smallest, 0


def cosine_distance(transform: torch.Tensor, tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of ``1 - cos((h_a - M) + M T, h_b)``: ReplaceMe's cosine objective."""
    branch, base, target = tokens
    return (1 - torch.nn.functional.cosine_similarity(base + branch @ transform, target, dim=-1)).mean()


def refine_by_cosine(start: torch.Tensor, kept: list[tuple[torch.Tensor, ...]], steps: int, *, diagonal: bool,
                     seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Adam from the least-squares ``T`` on random token batches; reports its own steps and time."""
    began = time.perf_counter()
    tokens = tuple(torch.cat([batch[i] for batch in kept]).to(start.device) for i in range(3))
    parameter = (start.diagonal() if diagonal else start).float().clone().requires_grad_(True)

    def as_matrix(value: torch.Tensor) -> torch.Tensor:
        return torch.diag(value) if diagonal else value

    with torch.no_grad():
        before = float(cosine_distance(as_matrix(parameter), tokens))
    optimizer = torch.optim.Adam([parameter], lr=COSINE_LR)
    generator = torch.Generator().manual_seed(seed)
    count = tokens[0].shape[0]
    for _ in range(steps):
        rows = torch.randint(0, count, (min(COSINE_BATCH_TOKENS, count),), generator=generator).to(start.device)
        loss = cosine_distance(as_matrix(parameter), tuple(t[rows] for t in tokens))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(cosine_distance(as_matrix(parameter), tokens))
    return as_matrix(parameter.detach()).to(torch.float64), {
        "cosine_steps": steps, "cosine_seconds": round(time.perf_counter() - began, 3),
        "cosine_distance_before": before, "cosine_distance_after": after,
    }


class ReplaceLinear(RepairMethod):
    name = "replace-linear"
    cost = 2
    options_class = ReplaceLinearOptions
    linear_statistics = True

    def check(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: ReplaceLinearOptions) -> None:
        super().check(loaded, runs, options)
        if loaded.adapter.post_norm:
            raise UsageError("replace-linear needs the MLP branch added to an unnormalised residual, but this model "
                             "normalises after the addition (do_layer_norm_before=False, e.g. OPT-350m); use merge")
        self.refuse_first_layer(runs, "folds its map into the MLP of")

    def keeps_tokens(self, options: ReplaceLinearOptions) -> bool:
        return options.solver == "cosine"  # it optimises on the tokens themselves

    def apply(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
              options: ReplaceLinearOptions) -> tuple[list[dict[str, Any]], str]:
        adapter = loaded.adapter
        layers = adapter.decoder_layers(loaded.model)
        diagonal = adapter.post_mlp_norm is not None
        records = []
        for (start, end), stats in zip(runs, statistics):
            assert stats.gram is not None and stats.cross is not None, "replace-linear collects MᵀM and MᵀY"
            transform, condition, dead = solve_linear_map(stats.gram, stats.cross, options.ridge, diagonal=diagonal,
                                                          label=f"{start}-{end - 1}")
            record: dict[str, Any] = {"map": "diagonal" if diagonal else "full", "condition_number": condition}
            if diagonal:
                record["dead_channels"] = dead
            if options.solver == "cosine":
                transform, solved = refine_by_cosine(transform, stats.kept, options.cosine_steps, diagonal=diagonal)
                record.update(solved)
            layer = layers[start - 1]
            if diagonal:
                scale_norm(layer.get_submodule(adapter.post_mlp_norm), transform.diagonal(), adapter.norm_kind)
            else:
                fold_linear_map(layer.get_submodule(adapter.mlp_output), transform)
            records.append(record)
        target = (f"a diagonal map folded into the weight of the post-MLP norm `{adapter.post_mlp_norm}` (this "
                  "family normalises the MLP output, which a full map cannot pass through)" if diagonal
                  else f"a linear map folded into the MLP output projection `{adapter.mlp_output}`")
        note = (f"each removed run was replaced by {target} of the layer before it, fitted by "
                f"{'least squares then cosine distance' if options.solver == 'cosine' else 'least squares'} "
                "on calibration data (ReplaceMe); no parameter was added")
        return records, note


REPAIRS.register(ReplaceLinear.name)(ReplaceLinear())
