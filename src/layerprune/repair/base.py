"""What every training-free repair method shares: its contract and the table that names it.

A repair method sees the model *before* the cut (the statistics come from the original), folds
its correction into layers that the cut keeps, and leaves the removal itself to plain layer
surgery afterwards. So the result has exactly the parameters of plain removal, and each method
only says which statistics it needs, what it refuses, and how it folds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from layerprune.errors import UsageError, mention
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import KINDS, unit_name
from layerprune.options import Config
from layerprune.registry import Registry
from layerprune.repair.statistics import RunStatistics


class RepairMethod(ABC):
    """One training-free repair. ``runs`` are half-open ``[a, b)`` in the indices of the model as given."""

    name: ClassVar[str]
    options_class: ClassVar[type[Config] | None] = None
    needs_statistics: ClassVar[bool] = True
    """False for a method that reads weights only (merge): no calibration pass runs."""
    linear_statistics: ClassVar[bool] = False
    """True when the method needs ``MᵀM`` and ``MᵀY``, not only the magnitudes."""
    branch_cuts: ClassVar[bool] = False
    """True when the method also repairs a cut of attention and MLP branches (:meth:`apply_units`)."""
    cost: ClassVar[int]
    """Relative cost of one repair (0 = reads weights only; higher = more statistics or solving): a
    search tries the cheapest first, so a time budget spent early still ranks the cheap repairs."""

    def check(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: Any) -> None:
        """Refuse a cut this method cannot repair, before any data is read."""
        if loaded.adapter.inferred:
            raise UsageError(f"{self.name} needs to know where {loaded.adapter.family} layers keep their norms and "
                             "output projections, but this family has no registered adapter; prune it plainly")

    def check_units(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: Any) -> None:
        """Refuse a cut of branches (``runs`` of units: ``2i`` layer ``i``'s attention, ``2i + 1`` its MLP)
        this method cannot repair, before any data is read."""
        self.check_branch_cuts()
        self.check(loaded, runs, options)

    def check_branch_cuts(self) -> None:
        """Refuse, before any model is loaded, to repair a cut of branches with a method that cannot."""
        if not self.branch_cuts:
            usable = ", ".join(name for name, method in REPAIRS.registered() if method.branch_cuts)
            raise UsageError(f"{self.name} repairs a cut of whole layers only (not yet one that removes attention or "
                             f"MLP branches); repair a branch cut with {usable}, or prune it plainly")

    def apply_units(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
                    options: Any) -> tuple[list[dict[str, Any]], str]:
        """:meth:`apply` for ``runs`` of branch units (only where ``branch_cuts``)."""
        raise NotImplementedError(f"{self.name} does not repair a cut of branches")

    def keeps_tokens(self, options: Any) -> bool:
        """Whether the statistics pass must also keep the real tokens' activations (bounded memory otherwise)."""
        return False

    def refuse_first_layer(self, runs: list[tuple[int, int]], how: str) -> None:
        """A run starting at layer 0 has no kept layer before it to fold into."""
        if runs and runs[0][0] == 0:
            first = runs[0]
            raise UsageError(f"{self.name} {how} the layer kept before the cut, but the removed run "
                             f"{first[0]}-{first[1] - 1} starts at layer 0, which has none; keep layer 0 "
                             f"(cut from layer 1) or repair this cut with {mention('method')} rescale")

    @abstractmethod
    def apply(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
              options: Any) -> tuple[list[dict[str, Any]], str]:
        """Fold the repair into ``loaded`` (still uncut); returns one statistics record per run and
        a sentence for the model card that says what was changed."""


def unit_names(loaded: LoadedModel, start: int, end: int) -> list[str]:
    """The units ``[start, end)`` (``2i``: layer ``i``'s attention, ``2i + 1``: its MLP) as ``attn.N`` /
    ``mlp.N`` in the original numbering."""
    original = loaded.original_layer_ids
    return [unit_name(KINDS[unit % 2], original[unit // 2]) for unit in range(start, end)]


def run_label(loaded: LoadedModel, start: int, end: int) -> str:
    """The run of units ``[start, end)`` in words: ``mlp.2`` or ``attn.3-mlp.4`` (original numbering)."""
    names = unit_names(loaded, start, end)
    return names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"


REPAIRS: Registry[RepairMethod] = Registry("repair method")
"""The training-free methods by name (each module registers its own); each is also a healing method of
``layerprune heal`` (:mod:`layerprune.healing.repairs`)."""
