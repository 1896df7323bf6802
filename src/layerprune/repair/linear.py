"""``replace-linear`` (ReplaceMe, NeurIPS 2025): one linear map stands in for a removed run.

For a removed run ``[a, b)`` the pruned model hands layer ``a-1``'s output, ``h_a - M + M``, to
the layers after the cut, which were trained on ``h_b``. ReplaceMe picks ``T`` so that
``(h_a - M) + M T ≈ h_b``, i.e. ``T = argmin ||M T - Y||²`` with ``Y = h_b - h_a + M``, solved
from the accumulated ``MᵀM`` and ``MᵀY``, and folds it into the MLP output projection
(``W ← Tᵀ W``): no parameter is added.

At a cut of branches (runs of units ``[a, b)``: ``2i`` layer ``i``'s attention, ``2i + 1`` its MLP)
the same holds with ``M`` the last kept branch before the run, unit ``a-1``, which may be an
attention: ``T`` then folds into the attention output projection.

Gemma-2/3 normalise each branch's output after the projection, which a full ``T`` cannot pass
through; there a diagonal ``T`` (ReplaceMe's diagonal option) is folded into that norm's weight. The
``cosine`` solver continues from the least-squares ``T`` with Adam on ReplaceMe's cosine-distance
objective, on the run's real tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from layerprune.errors import UsageError, mention
from layerprune.models.architectures import ArchitectureAdapter
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import ATTENTION, KINDS, MLP, has_branch
from layerprune.options import Config, option
from layerprune.repair.base import REPAIRS, RepairMethod, run_label
from layerprune.repair.folds import fold_linear_map, scale_norm
from layerprune.repair.statistics import RunStatistics

SOLVERS = ("lstsq", "cosine")
COSINE_LR = 1e-4
COSINE_BATCH_TOKENS = 4096
BRANCH_WORDS = {ATTENTION: "attention", MLP: "MLP"}


class ReplaceLinearOptions(Config):
    """How ``replace-linear`` estimates its map."""

    unit = "replace-linear"

    ridge: float = option(0.0, "ridge added to MᵀM before solving (0 = ReplaceMe's plain least squares)", minimum=0.0)
    solver: str = option("lstsq", "lstsq: least squares; cosine: then Adam on ReplaceMe's cosine distance",
                         choices=SOLVERS)
    cosine_steps: int = option(300, "Adam steps of the cosine solver", minimum=1)


def solve_linear_map(gram: torch.Tensor, cross: torch.Tensor, ridge: float, *, diagonal: bool,
                     label: str, branch: str = "MLP") -> tuple[torch.Tensor, float, int]:
    """``T`` solving ``(MᵀM + αI) T = MᵀY`` (or its diagonal version), the system's condition
    number, and how many channels were dead (diagonal only).

    A full system whose smallest eigenvalue is within rounding of zero relative to its largest (the
    numerical-rank rule of ``matrix_rank``) is refused rather than solved into noise. A diagonal
    system is one 1x1 system per channel: a channel the branch never drives (zero on every token,
    e.g. a post-norm weight of 0) has no say in the loss whatever its factor, so it keeps factor 1
    (its weight unchanged) and is counted; only a branch dead in every channel is refused. ``label``
    names the removed run and ``branch`` the kind of branch before it (``MLP``, ``attention``) in
    the refusals.
    """
    hidden = gram.shape[0]
    if diagonal:
        spectrum = gram.diagonal() + ridge
        largest = float(spectrum.max())
        live = spectrum > largest * hidden * torch.finfo(spectrum.dtype).eps
        if largest <= 0 or not bool(live.any()):
            raise UsageError(f"the {branch} branch before the removed run {label} is zero on every calibration token; "
                             "use other calibration data, or repair this cut with --method rescale")
        factors = torch.where(live, cross.diagonal() / torch.where(live, spectrum, 1.0), 1.0)
        return torch.diag(factors), largest / float(spectrum[live].min()), int((~live).sum())
    spectrum = torch.linalg.eigvalsh(gram + ridge * torch.eye(hidden, dtype=gram.dtype, device=gram.device))
    largest, smallest = float(spectrum.max()), float(spectrum.min())
    if largest <= 0 or smallest <= largest * hidden * torch.finfo(spectrum.dtype).eps:
        raise UsageError(f"the least-squares system of the removed run {label} is singular (the calibration tokens do "
                         f"not span the {hidden} channels of the {branch} output); use more or more varied calibration "
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


def fold_into_branch(layer: torch.nn.Module, adapter: ArchitectureAdapter, kind: str, transform: torch.Tensor) -> str:
    """Make what ``layer``'s ``kind`` branch adds to the residual become its old output times ``transform``;
    returns where it went. A family that normalises the branch output (Gemma) takes a diagonal map into
    that norm's weight; otherwise the map folds into the output projection, into each of the attention's
    when it has several (the branch is their sum)."""
    post_norm = adapter.post_branch_norm(kind)
    if post_norm is not None:
        scale_norm(layer.get_submodule(post_norm), transform.diagonal(), adapter.norm_kind)
        return f"a diagonal map folded into the weight of the post-{BRANCH_WORDS[kind]} norm `{post_norm}`"
    projections = adapter.attention_outputs if kind == ATTENTION else (adapter.mlp_output,)
    for path in projections:
        fold_linear_map(layer.get_submodule(path), transform)
    paths = ", ".join(f"`{path}`" for path in projections)
    return f"a linear map folded into the {BRANCH_WORDS[kind]} output projection {paths}"


class ReplaceLinear(RepairMethod):
    name = "replace-linear"
    cost = 2
    options_class = ReplaceLinearOptions
    linear_statistics = True
    branch_cuts = True

    def check(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: ReplaceLinearOptions) -> None:
        self.check_family(loaded)
        self.refuse_first_layer(runs, "folds its map into the MLP of")
        self.refuse_removed_branch(loaded, [(2 * start, 2 * end) for start, end in runs])

    def check_units(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: ReplaceLinearOptions) -> None:
        """The branch before each removed run of units, ``a-1``, takes the map: there must be one, present in
        the model, with a residual stream on either side of it (from which its output is read)."""
        self.check_branch_cuts()
        self.check_family(loaded)
        if not loaded.adapter.stream_between_branches:
            raise UsageError(f"{loaded.adapter.family} layers feed their attention and MLP the same input (parallel "
                             "residual), so there is no residual stream between a layer's two branches to read the "
                             "branch before a removed run from; remove whole layers to repair with replace-linear, or "
                             f"repair this cut with {mention('method')} rescale")
        if runs and runs[0][0] == 0:
            first = run_label(loaded, 0, 1)
            raise UsageError(f"{self.name} folds its map into the branch kept before the cut, but the removed run "
                             f"{run_label(loaded, *runs[0])} starts at the model's first branch, {first}, which has "
                             f"none before it; keep {first} or repair this cut with {mention('method')} rescale")
        self.refuse_removed_branch(loaded, runs)

    def check_family(self, loaded: LoadedModel) -> None:
        """Refuse a family whose branch outputs the map cannot be folded into."""
        super().check(loaded, [], None)
        if loaded.adapter.post_norm:
            raise UsageError("replace-linear needs the MLP branch added to an unnormalised residual, but this model "
                             "normalises after the addition (do_layer_norm_before=False, e.g. OPT-350m); use merge")

    def refuse_removed_branch(self, loaded: LoadedModel, runs: list[tuple[int, int]]) -> None:
        """Refuse a run whose branch before it (unit ``a-1``) an earlier cut removed: it adds nothing, so
        no map of it can stand in for the run."""
        layers = loaded.adapter.decoder_layers(loaded.model)
        for start, end in runs:
            if start > 0 and not has_branch(layers[(start - 1) // 2], loaded.adapter, KINDS[(start - 1) % 2]):
                raise UsageError(f"{self.name} folds its map into the branch kept before the removed run "
                                 f"{run_label(loaded, start, end)}, but {run_label(loaded, start - 1, start)} was "
                                 "removed by an earlier cut and adds nothing; repair this cut with "
                                 f"{mention('method')} rescale, or prune it plainly")

    def keeps_tokens(self, options: ReplaceLinearOptions) -> bool:
        return options.solver == "cosine"  # it optimises on the tokens themselves

    def apply(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
              options: ReplaceLinearOptions) -> tuple[list[dict[str, Any]], str]:
        return self.apply_units(loaded, [(2 * start, 2 * end) for start, end in runs], statistics, options)

    def apply_units(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
                    options: ReplaceLinearOptions) -> tuple[list[dict[str, Any]], str]:
        """Units ``2i`` / ``2i + 1``: layer ``i``'s attention / MLP; a whole-layer run ``[a, b)`` is ``[2a, 2b)``,
        whose branch before it is the MLP of layer ``a-1``. Each run's ``M`` is the branch before it, unit
        ``a-1``, as added to the residual, and its map folds into that branch."""
        adapter = loaded.adapter
        layers = adapter.decoder_layers(loaded.model)
        records, targets = [], {}
        for (start, end), stats in zip(runs, statistics):
            assert stats.gram is not None and stats.cross is not None, "replace-linear collects MᵀM and MᵀY"
            kind = KINDS[(start - 1) % 2]
            diagonal = adapter.post_branch_norm(kind) is not None
            transform, condition, dead = solve_linear_map(stats.gram, stats.cross, options.ridge, diagonal=diagonal,
                                                          label=run_label(loaded, start, end),
                                                          branch=BRANCH_WORDS[kind])
            before = run_label(loaded, start - 1, start)
            record: dict[str, Any] = {"map": "diagonal" if diagonal else "full", "condition_number": condition,
                                      "folded_into": before}
            if diagonal:
                record["dead_channels"] = dead
            if options.solver == "cosine":
                transform, solved = refine_by_cosine(transform, stats.kept, options.cosine_steps, diagonal=diagonal)
                record.update(solved)
            targets[kind] = fold_into_branch(layers[(start - 1) // 2], adapter, kind, transform)
            records.append(record)
        diagonal_note = (" (this family normalises each branch output, which a full map cannot pass through)"
                         if any(record["map"] == "diagonal" for record in records) else "")
        note = (f"each removed run was replaced by {' or '.join(targets[kind] for kind in KINDS if kind in targets)} "
                f"of the branch kept before it (its `folded_into`){diagonal_note}, fitted by "
                f"{'least squares then cosine distance' if options.solver == 'cosine' else 'least squares'} "
                "on calibration data (ReplaceMe); no parameter was added")
        return records, note


REPAIRS.register(ReplaceLinear.name)(ReplaceLinear())
