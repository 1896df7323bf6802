"""The training-free repairs as healing methods, so ``layerprune heal --method replace-linear`` works.

Like the replacement methods, they rebuild the result from the original model: the statistics
must come from the original, and the folds land on its weights before the cut. The cut is read
from the pruned model's lineage, plus any ``--block`` (which also lets an unpruned model be cut
and repaired in one step): its removed whole layers and, for a model that removed single attention
or MLP branches, those branches too, so the result keeps them removed (``rescale`` and
``replace-linear`` repair such a cut; ``merge`` refuses it, as :func:`compensate` does).
"""

from __future__ import annotations

from typing import Any

from layerprune.data import DEFAULT_CALIBRATION
from layerprune.errors import OptionError, UsageError
from layerprune.healing.base import HEALERS, HealConfig, Healer, HealOutcome, TrainingOptions
from layerprune.healing.data import TrainingSet
from layerprune.healing.replacement import ReplacementOptions
from layerprune.models.surgery import consecutive_runs
from layerprune.models.lineage import LineageCut, lineage_cut
from layerprune.models.loading import LoadedModel
from layerprune.repair import REPAIRS, compensate
from layerprune.repair.base import RepairMethod


def removed_cut(loaded: LoadedModel, settings: HealConfig) -> LineageCut:
    """The cut to make and repair on the original: the lineage's removed layers and branches, and ``--block``."""
    lineage = loaded.lineage
    if lineage.get("replaced_blocks") or lineage.get("healing") or lineage.get("repairs"):
        raise UsageError(f"{settings.method} folds its repair into the original weights, but this model was already "
                         "replaced, healed or repaired; start from the plainly pruned checkpoint")
    recorded = lineage_cut(lineage)
    removed = set(recorded.layers)
    block = settings.options.block
    if block is not None and recorded.removes_anything and not set(range(*block)) <= removed:
        # on a pruned model the block names the removed run to repair; cutting more would repair a cut nobody
        # asked for (an unpruned model is cut at the block and repaired in one step)
        runs = ", ".join(f"{a}-{b - 1}" for a, b in consecutive_runs(sorted(removed))) or "no whole layers"
        raise OptionError.about("block", f"{block[0]}-{block[1] - 1} is not a removed run of this model (removed: "
                                         f"{runs}); name one of those, or give the unpruned model to cut and repair "
                                         "it in one step")
    if block is not None:
        removed.update(range(*block))
    cut = recorded._replace(layers=sorted(removed))
    if not cut.removes_anything:
        raise OptionError.about("block", f"is needed: {settings.method} repairs a cut, but this model's layerprune.json "
                                         "records no removed layers or branches; give the pruned checkpoint, or name "
                                         "the original layers to cut")
    return cut


class _TrainingFreeRepair(Healer):
    """Calls :func:`layerprune.repair.compensate` on the original; nothing is trained."""

    rebuilds_from_original = True
    trains = False
    method_name: str

    def repair_options(self, settings: HealConfig) -> Any:
        """The repair's own options out of the healer's (which add ``block``), for :func:`compensate`."""
        own = REPAIRS.get(self.method_name).options_class
        if own is None:
            return None
        return own(**{name: getattr(settings.options, name) for name in own.model_fields})

    def needs_original(self, settings: HealConfig) -> bool:
        return True

    def rows_to_draw(self, training: TrainingOptions) -> int:
        """A repair takes no steps, so steps x batch (800 rows by default) would only make its statistics
        pass long: without ``--samples`` it reads as many rows as ``prune --compensate`` calibrates on."""
        return training.samples if training.samples is not None else DEFAULT_CALIBRATION.samples

    def check(self, loaded: LoadedModel, settings: HealConfig) -> None:
        super().check(loaded, settings)
        cut = removed_cut(loaded, settings)
        original_layers = loaded.lineage.get("original_num_layers", loaded.num_layers)
        if cut.layers and cut.layers[-1] >= original_layers:
            raise OptionError.about("block", f"reaches layer {cut.layers[-1]}, but the original model has "
                                             f"{original_layers} layers (0..{original_layers - 1})")
        repair = REPAIRS.get(self.method_name)
        if cut.attention or cut.mlp:
            repair.check_branch_cuts()
        # what the method and the family allow is checked here (the pruned model has the original's family);
        # the cut names layers and branches of the original, which compensate checks there, before any statistics
        repair.check(loaded, [], self.repair_options(settings))

    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealConfig,
            original: LoadedModel | None) -> HealOutcome:
        assert original is not None, "a training-free repair always receives the original model"
        cut = removed_cut(loaded, settings)
        for key in ("reason", "recipe"):
            if key in loaded.lineage:
                original.lineage[key] = loaded.lineage[key]
        report = compensate(original, cut.layers, self.method_name, data, options=self.repair_options(settings),
                            batch_size=settings.training.batch_size,
                            reason=loaded.lineage.get("reason", "layers named by the user"),
                            attention=cut.attention, mlp=cut.mlp)
        return HealOutcome(original, f"training-free: {report.summary}", 0, [], report.seconds)


def healer_options(repair: RepairMethod) -> type:
    """The repair's options plus ``--block`` (the original layers to cut, as for the replacements):
    the healing method cuts the original itself, so it must know the cut."""
    bases = (repair.options_class, ReplacementOptions) if repair.options_class else (ReplacementOptions,)
    return type(f"{type(repair).__name__}HealOptions", bases, {"__module__": __name__, "unit": repair.name})


def _register(name: str) -> type[Healer]:
    repair = REPAIRS.get(name)
    healer = type(f"Repair{name.title().replace('-', '')}", (_TrainingFreeRepair,),
                  {"method_name": name, "options_class": healer_options(repair),
                   "__doc__": f"``{name}`` as a healing method: {type(repair).__module__}."})
    return HEALERS.register(name)(healer)


for _name in REPAIRS:
    _register(_name)
