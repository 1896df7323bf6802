"""``layerprune run``: replay a whole pipeline from one YAML recipe, resumably.

A recipe is a mapping of sections, each feeding one public API function with the same keyword
names (see :data:`SECTIONS`), so the recipe schema is the API itself:

    model: smollm2-135m
    calibration: {source: wiki-sample, samples: 64, seq_len: 256}   # -> layerprune.data.build_calibration
    score: {metrics: [bi]}                                           # -> layerprune.score
    select: {remove: 25%, strategy: independent}                      # -> layerprune.select
    repair: {method: replace-linear}                                  # -> layerprune.repair.compensate

or, instead of score/select/repair, a search for the cut (on the calibration section's data):

    search: {remove: 25%, max_candidates: 20}                          # -> layerprune.search (SearchConfig)
    heal: {method: partial-ft, data: wiki-sample, steps: 100}          # -> layerprune.heal (HealConfig)
    eval: {ppl: [wiki-sample], seq_len: 256}                          # -> layerprune.evaluate
    export: {format: transformers, max_shard_size: 500MB}             # -> layerprune.save, for every saved model

The run folder keeps the recipe, the scores (JSON + figure), the final model (``model/``), the
evaluation (JSON + Markdown + plots) and ``run.json``, which records each finished stage. Every
stage writes its outputs atomically and is marked done only afterwards, so a killed run resumes
at the first unfinished stage with ``--resume``. Before the run folder is created, :func:`preflight`
refuses every bad value that a stage would otherwise refuse only when it starts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerprune.api import prune, save
from layerprune.cache import cache_dir
from layerprune.data import CalibrationConfig, build_calibration, check_source
from layerprune.errors import OptionError, UsageError, worded
from layerprune.evaluation import evaluate
from layerprune.evaluation.config import EvalConfig
from layerprune.healing import HEALERS, heal
from layerprune.healing.base import HealConfig, TrainingOptions
from layerprune.healing.engine import STATE_FILE as HEAL_STATE
from layerprune.models.export import PLACEMENT, ExportConfig
from layerprune.models.loading import LoadedModel, load_model, read_local_config
from layerprune.models.sublayers import KINDS
from layerprune.outputs import check_output_path, write_bytes_atomic, write_json_atomic, writing
from layerprune.recipes.record import RunDocument
from layerprune.recipes.schema import FieldSpec, build_arguments, check_section, fields_of, option_fields
from layerprune.recipes.yamlfile import KeyPath, read_yaml
from layerprune.records import checked, read_checked
from layerprune.repair import REPAIRS, RepairConfig, compensate
from layerprune.reporting.eval_tables import comparison_table, write_report
from layerprune.reporting.scores import format_table, plot_scores
from layerprune.scoring import METRICS, ScoreConfig, check_score_options, rescorer, score
from layerprune.searching import SearchConfig, candidate_metrics, search
from layerprune.searching.search import held_out_source
from layerprune.selection import SelectConfig, parse_remove, scored_metric, select


STATE_FILE = "run.json"


def _section_fields() -> dict[str, dict[str, FieldSpec]]:
    """Recipe sections and their keys, read off the API functions they feed."""
    return {
        "repair": _repair_fields(),
        "search": _search_fields(),
        "load": fields_of(load_model, skip=("name_or_path", "check_config")),
        "calibration": option_fields(CalibrationConfig),
        "score": {**option_fields(ScoreConfig), **option_fields(*(METRICS.get(name).options_class for name in METRICS))},
        "select": option_fields(SelectConfig),
        "heal": _heal_fields(),
        "eval": option_fields(EvalConfig),
        "export": {name: spec for name, spec in option_fields(ExportConfig).items() if name not in PLACEMENT},
    }


HEAL_REQUIRED = ("method", "data")
"""The keys of :class:`HealConfig` a recipe's heal section must give: the config refuses itself without
them, and the schema says so first, at the section's line."""

HEAL_ELSEWHERE = ("training", "options", "checkpoint_dir", "resume")
"""The keys of :class:`HealConfig` a heal section does not take: the shared and the method's own options
are written flat, and the run folder holds the checkpoints (so a killed heal resumes)."""


def _heal_fields() -> dict[str, FieldSpec]:
    """The heal section: :class:`HealConfig`'s own keys, and every method's options flat beside the
    shared training options (each method reads those it declares; another method's is refused)."""
    own = {name: FieldSpec(spec.annotation, required=name in HEAL_REQUIRED)
           for name, spec in option_fields(HealConfig).items() if name not in HEAL_ELSEWHERE}
    return {**own, **option_fields(TrainingOptions, *(HEALERS.get(name).options_class for name in HEALERS))}


def _search_fields() -> dict[str, FieldSpec]:
    """The search section: :class:`SearchConfig`'s options but those of :data:`SEARCH_ELSEWHERE`, and
    the metrics' options as the score section takes them (the search scores every metric)."""

    own = {name: spec for name, spec in option_fields(SearchConfig).items() if name not in SEARCH_ELSEWHERE}
    return {**own, **option_fields(*(METRICS.get(name).options_class for name in METRICS))}


def _search_arguments(recipe: Recipe) -> tuple[SearchConfig, dict[str, Any]]:
    """The search section as :func:`layerprune.search` takes it: its own options as a checked
    :class:`SearchConfig`, and the metrics' options."""

    section = recipe.sections["search"]
    own = {key: value for key, value in section.items() if key in SearchConfig.model_fields}
    return SearchConfig(**own), {key: value for key, value in section.items() if key not in own}


def _repair_fields() -> dict[str, FieldSpec]:
    """The repair section: :class:`RepairConfig`'s method and batch beside every repair method's own
    options, flat (each method reads those its options class declares; its ``options`` are those keys)."""

    own = {name: spec for name, spec in option_fields(RepairConfig).items() if name != "options"}
    return {**own, **option_fields(*(method.options_class for _, method in REPAIRS.registered()))}


def _repair_options(section: dict[str, Any]) -> dict[str, Any]:
    """The repair section as :func:`compensate`'s keyword arguments: a :class:`RepairConfig` built
    from its flat keys (see :meth:`RepairConfig.from_flat`), checked as the flags are."""

    return dict(RepairConfig.from_flat(section))


PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("model",), ("calibration", "source"), ("search", "rank_data"), ("heal", "data"), ("heal", "prompts"),
    ("heal", "original"), ("eval", "ppl"), ("eval", "fidelity"), ("eval", "reference"), ("eval", "generation_prompts"),
)


def _looks_local(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or ".." in Path(value).parts or Path(value).exists()


def check_recipe_paths(values: dict[str, Any], lines: dict[tuple[str, ...], int], file: Path,
                       allowed: list[Path]) -> None:
    """Refuse local paths that lie outside the folders the user named (the recipe's folder, the
    working directory, the cache and any ``--allow-path``), so a recipe from elsewhere cannot read
    arbitrary files."""

    roots = [file.parent.resolve(), Path.cwd().resolve(), cache_dir().resolve(), *(p.resolve() for p in allowed)]
    for key_path in PATH_KEYS:
        value: Any = values
        for key in key_path:
            value = value.get(key) if isinstance(value, dict) else None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or not _looks_local(item):
                continue
            resolved = Path(item).expanduser().resolve()
            if not any(resolved == root or root in resolved.parents for root in roots):
                raise UsageError(
                    f"{file} line {lines.get(key_path, '?')}: path {item!r} lies outside the recipe's folder and the "
                    "working directory; move it there or pass --allow-path for its folder"
                )


TOP_LEVEL = {
    "name": FieldSpec(str), "description": FieldSpec(str), "model": FieldSpec(str),
    **{section: FieldSpec(dict) for section in ("load", "calibration", "score", "select", "repair", "search", "heal",
                                                "eval", "export")},
}

SAVING_SECTIONS = ("select", "search", "heal")
"""The sections whose stage saves a model (select's prune stage, search, heal): those an ``export``
section applies to."""

SEARCH_ELSEWHERE = ("heal",)
"""Options of :class:`SearchConfig` a recipe gives in another section: healing is the heal section's,
a stage of its own after the search (the search's calibration is the calibration section)."""


@dataclass
class Recipe:
    """A validated recipe: the keyword arguments of each section, ready to call."""
    path: Path
    text: str
    model: str
    sections: dict[str, dict[str, Any]]
    lines: dict[KeyPath, int] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256((self.text + "\0" + self.model).encode()).hexdigest()[:16]


OPT_INS = {"trust_remote_code": "--trust-remote-code", "allow_pickle": "--allow-pickle"}
"""The ``load`` keys that let a model run code (its own Python; pickle weights), each with the flag of
``layerprune run`` by which the person running the recipe grants it."""


def check_opt_ins(values: dict[str, Any], lines: dict[KeyPath, int], file: Path, granted: set[str]) -> None:
    """Refuse a recipe that asks for a right only the person running it may grant: a file someone else
    wrote must never let a model's own code run (the flag or keyword ``granted`` must say so)."""
    load = values.get("load")
    for key, flag in OPT_INS.items():
        if isinstance(load, dict) and load.get(key) and key not in granted:
            raise UsageError(f"{file} line {lines.get(('load', key), '?')}: the recipe asks for {key}, which only "
                             f"the person running it can grant; pass {flag} to layerprune run ({key}=True to "
                             "run_recipe) if you trust this model, or remove the key")


def load_recipe(path: str | Path, model: str | None = None, allowed_paths: list[Path] | None = None,
                granted: set[str] | frozenset[str] = frozenset()) -> Recipe:
    """Read and validate ``path``; ``model`` (e.g. from ``--model``) overrides the recipe's model.
    ``granted`` names the opt-ins of :data:`OPT_INS` the caller grants."""
    file = Path(path).expanduser()
    values, lines = read_yaml(file)
    check_section(values, TOP_LEVEL, file=file, lines=lines, path=())
    check_opt_ins(values, lines, file, set(granted))
    check_recipe_paths(values, lines, file, allowed_paths or [])
    fields = _section_fields()
    sections = {
        name: build_arguments(values[name] or {}, fields[name], file=file, lines=lines, path=(name,))
        for name in fields if name in values
    }
    chosen = model or values.get("model")
    if not chosen:
        raise OptionError.about("model", f"is not named: {file} names no model; add 'model: smollm2-135m' to it or "
                                         "give one")
    if not any(stage.needs in sections for stage in STAGES):
        raise UsageError(f"{file}: the recipe has no stage to run; add a score, heal or eval section")
    if "select" in sections and "score" not in sections and not any(
            sections["select"].get(name) is not None for name in ("layers", "attention", "mlp")):
        raise UsageError(f"{file} line {lines.get(('select',), '?')}: 'select' needs a 'score' section to choose from, "
                         "or the layers (or attention and mlp branches) to remove")
    if "repair" in sections and "select" not in sections:
        raise UsageError(f"{file} line {lines.get(('repair',), '?')}: 'repair' repairs the cut a 'select' section "
                         "chooses; add one")
    if "search" in sections:
        clash = [name for name in ("score", "select", "repair") if name in sections]
        if clash:
            raise UsageError(f"{file} line {lines.get(('search',), '?')}: 'search' chooses and repairs the cut itself; "
                             f"remove the {', '.join(clash)} section(s), or the search section")
    if "export" in sections and not any(name in sections for name in SAVING_SECTIONS):
        raise UsageError(f"{file} line {lines.get(('export',), '?')}: 'export' says how a model is saved, and no stage "
                         f"saves one; add a {', '.join(SAVING_SECTIONS)} section, or remove the export section")
    if ("score" in sections or "search" in sections) and "calibration" not in sections:
        sections["calibration"] = {}  # CalibrationConfig's defaults, the same as the flags' and the API's
    return Recipe(file, file.read_text(), str(chosen), sections, lines)


@dataclass
class RunState:
    """What ``run.json`` records (:class:`RunDocument`): the recipe's fingerprint and every finished stage."""
    folder: Path
    fingerprint: str
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self) -> None:
        write_json_atomic(self.folder / STATE_FILE, checked(RunDocument, {"recipe_fingerprint": self.fingerprint,
                                                                          "stages": self.finished}))

    def done(self, stage: str) -> bool:
        return stage in self.finished

    def finish(self, stage: str, seconds: float, **facts: Any) -> None:
        self.finished[stage] = {"seconds": round(seconds, 1), **facts}
        self.save()


def _open_run_folder(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> RunState:
    state_file = out / STATE_FILE
    if resume and state_file.exists():
        saved = read_checked(state_file, RunDocument, "start the run again (overwrite) or into a new folder")
        if saved["recipe_fingerprint"] != recipe.fingerprint:
            raise OptionError.about("resume", f"cannot continue {out}: it was started with a different recipe or "
                                              "model; choose a new output folder or overwrite it")
        return RunState(out, recipe.fingerprint, saved["stages"])
    if out.exists() and resume and not overwrite and any(out.iterdir()):
        # resuming is continuing a run: a folder without run.json (a pruned model, say) is none to continue,
        # and must never be deleted to start one
        raise OptionError.about("resume", f"cannot continue {out}: it holds no run ({STATE_FILE}); choose a new "
                                          "output folder, or overwrite it to start a run there")
    if out.exists() and not overwrite and not resume:
        raise OptionError.about("overwrite", f"is off and the output {out} already exists; resume it, overwrite "
                                             "it to start again, or choose a new output folder")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_bytes_atomic(out / "recipe.yaml", recipe.text.encode())
    state = RunState(out, recipe.fingerprint)
    state.save()
    return state


@dataclass
class RunContext:
    """What the stages share while one recipe runs."""
    recipe: Recipe
    out: Path
    state: RunState
    loaded: LoadedModel | None = None
    log: Callable[[str], None] = print

    def load(self, where: str | Path) -> LoadedModel:
        return load_model(where, **self.recipe.sections.get("load", {}))

    @property
    def export(self) -> dict[str, Any]:
        """How each stage that saves a model writes it: the export section (its declaration's defaults
        without one)."""
        return self.recipe.sections.get("export", {})

    @property
    def final_dir(self) -> Path:
        return self.out / "model"

    @property
    def pruned_dir(self) -> Path:
        return self.out / ("pruned" if "heal" in self.recipe.sections else "model")


def _stage_score(ctx: RunContext) -> dict[str, Any]:
    loaded = ctx.load(ctx.recipe.model)
    options = ctx.recipe.sections["calibration"]
    calibration = build_calibration(loaded.tokenizer, **options)
    score_options = ctx.recipe.sections["score"]
    report = score(loaded, calibration, **score_options)
    selection = None
    if "select" in ctx.recipe.sections:
        rescore = rescorer(loaded, calibration, **{k: v for k, v in score_options.items() if k != "metrics"})
        selection = select(report, **dict(SelectConfig(**ctx.recipe.sections["select"])), rescore=rescore)
    ctx.log(format_table(report, selection))
    write_json_atomic(ctx.out / "scores.json", report.to_json(selection))
    plot_scores(report, ctx.out / "scores.png", selection)
    return {"remove": selection.remove if selection else None}


def _stage_prune(ctx: RunContext) -> dict[str, Any]:
    branches: dict[str, list[int]] = {}
    if ctx.state.done("score"):
        remove = ctx.state.finished["score"]["remove"]
        selection = json.loads((ctx.out / "scores.json").read_text()).get("selection", {})
        reason = f"metric {selection.get('metric')}, {selection.get('strategy')} selection of {len(remove)} layers"
    else:  # a select section naming its layers and branches (a search's recipe replaying its winner)
        named = SelectConfig(**ctx.recipe.sections["select"])
        remove = sorted(named.layers or ())
        branches = {kind: sorted(getattr(named, kind) or ()) for kind in KINDS}
        reason = (f"the {len(remove)} layers the recipe names" if not any(branches.values())
                  else "the layers and branches the recipe names")
    loaded = ctx.load(ctx.recipe.model)
    if "repair" in ctx.recipe.sections:  # beside named branches, a method that repairs them (preflight checks)
        # the rows the score stage scored on: the same section, so the same windows
        rows = build_calibration(loaded.tokenizer, **ctx.recipe.sections["calibration"])
        compensate(loaded, remove, data=rows, reason=reason, **branches,
                   **_repair_options(ctx.recipe.sections["repair"]))
    else:
        prune(loaded, remove, reason=reason, **branches)
    # overwrite: a run killed after this save but before run.json recorded the stage left a
    # complete folder that no finished stage owns; redoing the stage replaces it
    save(loaded, ctx.pruned_dir, recipe=_recipe_record(ctx), overwrite=True, **ctx.export)
    return {"removed_layers": remove, "model": str(ctx.pruned_dir)}


def _stage_search(ctx: RunContext) -> dict[str, Any]:
    config, metric_options = _search_arguments(ctx.recipe)
    record = search(ctx.recipe.model, config, calibration=CalibrationConfig(**ctx.recipe.sections["calibration"]),
                    metric_options=metric_options, out=ctx.out / "search", overwrite=True, export_options=ctx.export,
                    load_options=ctx.recipe.sections.get("load", {}))
    assert record.out is not None, "a search with an output folder records it"
    return {"winner": record.winner.label, "removed_layers": record.winner.candidate.remove,
            "model": str(record.out / "model")}


def _cut_model(ctx: RunContext) -> Path | None:
    """The cut model a finished prune or search stage saved, if any."""
    for stage in ("prune", "search"):
        if ctx.state.done(stage):
            return Path(ctx.state.finished[stage]["model"])
    return None


def _stage_heal(ctx: RunContext) -> dict[str, Any]:
    cut = _cut_model(ctx)
    loaded = ctx.load(cut if cut is not None else ctx.recipe.model)
    checkpoints = _heal_checkpoints(ctx.out)
    config = _heal_config(ctx.recipe, ctx.out, resume=(checkpoints / HEAL_STATE).exists())
    healed = heal(loaded, config)
    save(healed, ctx.final_dir, recipe=_recipe_record(ctx), overwrite=True, **ctx.export)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {"method": config.method, "model": str(ctx.final_dir)}


def _stage_eval(ctx: RunContext) -> dict[str, Any]:
    cut = _cut_model(ctx)
    candidates = [cut] if cut is not None else []
    if ctx.state.done("heal") or cut is None:
        candidates.append(ctx.final_dir)
    compare = [str(path) for path in dict.fromkeys(candidates) if path.exists()]
    load_options = ctx.recipe.sections.get("load", {})
    report = evaluate(ctx.recipe.model, compare=compare, **ctx.recipe.sections["eval"], **load_options)
    write_report(report, ctx.out / "eval.json")
    ctx.log(comparison_table(report))
    return {"compared": compare}


def _heal_checkpoints(out: Path) -> Path:
    """Where the heal stage checkpoints: in the run folder, so a resumed run finds them."""
    return out / "heal-checkpoints"


def _heal_config(recipe: Recipe, out: Path, *, resume: bool = False) -> HealConfig:
    """The heal section as the stage's :class:`HealConfig`: checkpoints in the run folder (taken every
    quarter of the steps unless ``checkpoint_every`` says otherwise), so a killed heal resumes."""
    return HealConfig(**recipe.sections["heal"], checkpoint_dir=_heal_checkpoints(out), resume=resume)


def _recipe_record(ctx: RunContext) -> dict[str, Any]:
    return {"file": ctx.recipe.path.name, "text": ctx.recipe.text, "model": ctx.recipe.model}


@dataclass(frozen=True)
class Stage:
    """One resumable step of a run: it runs when its recipe section is present."""
    name: str
    needs: str
    run: Callable[[RunContext], dict[str, Any]]


STAGES = (
    Stage("score", "score", _stage_score),
    Stage("prune", "select", _stage_prune),
    Stage("search", "search", _stage_search),
    Stage("heal", "heal", _stage_heal),
    Stage("eval", "eval", _stage_eval),
)


def _with_defaults(function: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed with ``function``'s defaults: the values its stage will really use."""
    bound = inspect.signature(function).bind_partial(**options)
    bound.apply_defaults()
    return bound.arguments


@contextmanager
def _at(recipe: Recipe, *key_path: str) -> Iterator[None]:
    """Prefix a refusal with the recipe line of ``key_path``, or of its section when the key is left
    to its default (no line where the runner added the section itself)."""
    try:
        yield
    except OptionError as error:  # one option's value: named as the recipe writes it, at its own line
        key = (key_path[0], *error.name.split("."))  # a nested option's name is its path in the section
        line = recipe.lines.get(key) or recipe.lines.get(key_path) or recipe.lines.get(key_path[:1])
        where = f"{recipe.path} line {line}" if line else str(recipe.path)
        raise UsageError(f"{where}: {worded(error.render('.'.join(key)))}") from None
    except UsageError as error:
        line = recipe.lines.get(key_path) or recipe.lines.get(key_path[:1])
        where = f"{recipe.path} line {line}" if line else str(recipe.path)
        raise UsageError(f"{where}: {error}") from None


def preflight(recipe: Recipe, out: Path) -> None:
    """Refuse every value a stage would refuse when it starts, before the run folder exists or any
    model is loaded: a missing eval file must not cost a scoring and a healing run first.

    Each check is the one the stage's API function runs itself. The layer count comes from the
    model's ``config.json``; where reading it would cost a download (a hub id, an alias not yet
    fetched, a GGUF file) the checks that need it wait for their stage.
    """

    sections = recipe.sections
    load = _with_defaults(load_model, sections.get("load", {}))
    with _at(recipe, "load", "gguf_file"):
        config = read_local_config(recipe.model, gguf_file=load["gguf_file"],
                                   trust_remote_code=load["trust_remote_code"], allow_pickle=load["allow_pickle"])
    layers: int | None = getattr(config, "num_hidden_layers", None)  # after pruning, once select is read
    if "calibration" in sections:
        with _at(recipe, "calibration"):
            calibration = CalibrationConfig(**sections["calibration"])
        with _at(recipe, "calibration", "source"):
            check_source(calibration.source, calibration.split)
    if "search" in sections:
        with _at(recipe, "search"):
            searched, metric_options = _search_arguments(recipe)
            check_score_options(candidate_metrics(), searched.batch_size, **metric_options)
            if layers is not None and searched.removal is not None:
                layers -= parse_remove(searched.removal, layers)
        with _at(recipe, "search", "rank_data"):  # load_recipe gives a search a calibration section
            held_out_source(calibration.source, calibration.split, searched.rank_data)
    if "select" in sections and "score" not in sections:  # load_recipe lets it only with its layers
        with _at(recipe, "select", "layers"):
            removed = SelectConfig(**sections["select"]).count(layers)
        if layers is not None and removed is not None:
            layers -= removed
    if "score" in sections:
        options = _with_defaults(score, sections["score"])
        with _at(recipe, "score"):
            scored = check_score_options(options["metrics"], options["batch_size"], options["granularity"],
                                         **options["options"])
            if scored.granularity != "layer" and "select" in sections:
                scored.refuse("granularity", "sublayer: a recipe's prune stage removes whole layers (branch cuts are "
                                             "layerprune prune --granularity sublayer's); drop the select section")
        if "select" in sections:  # load_recipe refuses a select section without a score section
            with _at(recipe, "select"):
                selecting = SelectConfig(**sections["select"])
            with _at(recipe, "select", "metric"):
                scored_metric(selecting.metric, list(scored.metrics))
            with _at(recipe, "select", "remove"):
                removed = selecting.count(layers)  # without a layer count: only that it is given
            if layers is not None and removed is not None:
                layers -= removed
    if "repair" in sections:
        with _at(recipe, "repair", "method"):
            repairing = RepairConfig.from_flat(sections["repair"])
            if "select" in sections and any(sections["select"].get(kind) is not None for kind in KINDS):
                repairing.repairer.check_branch_cuts()  # the select section names single branches
    if "heal" in sections:
        with _at(recipe, "heal", "method"):
            healer = HEALERS.get(sections["heal"]["method"])()
        with _at(recipe, "heal"):
            healing = _heal_config(recipe, out)
        with _at(recipe, "heal", "prompts" if healing.self_generated else "data"):
            healing.check_inputs()
        with _at(recipe, "heal"):
            healer.check_settings(healing, layers)
    if "export" in sections:
        with _at(recipe, "export"):
            ExportConfig(**sections["export"])
    if "eval" in sections:
        with _at(recipe, "eval"):
            evaluation = EvalConfig(**sections["eval"])
            evaluation.check_inputs()
            evaluation.check_depths(layers)


def run_recipe(path: str | Path, out: str | Path, *, model: str | None = None, resume: bool = False,
               overwrite: bool = False, allowed_paths: list[Path] | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Run every stage of the recipe at ``path`` into the folder ``out``; returns the folder.

    A recipe may ask for ``load: {trust_remote_code: true}`` or ``allow_pickle``, but only the caller
    grants them (``trust_remote_code``, ``allow_pickle``; on the command line the flags): a recipe is
    someone else's file and must not let a model run code on its own say-so."""
    granted = {key for key, given in (("trust_remote_code", trust_remote_code), ("allow_pickle", allow_pickle))
               if given}
    recipe = load_recipe(path, model, allowed_paths, granted)
    # existing: _open_run_folder decides between resuming, overwriting and refusing
    target = check_output_path(out, overwrite=True, protected=recipe_inputs(recipe))
    preflight(recipe, target)
    with writing():
        state = _open_run_folder(target, recipe, resume=resume, overwrite=overwrite)
    ctx = RunContext(recipe, target, state, log=log)
    try:
        for stage in STAGES:
            if stage.needs not in recipe.sections:
                continue
            if state.done(stage.name):
                log(f"[{stage.name}] already done, skipping")
                continue
            log(f"[{stage.name}] running")
            start = time.perf_counter()
            facts = stage.run(ctx)
            state.finish(stage.name, time.perf_counter() - start, **facts)
    except BaseException:
        _drop_if_nothing_done(target)
        raise
    return target


def _drop_if_nothing_done(folder: Path) -> None:
    """Delete a run folder that holds only what opening it wrote (the recipe and the state, no
    stage's output, no checkpoint to resume from), so a run failing in its first stage leaves
    nothing that looks like a run."""
    if folder.is_dir() and {item.name for item in folder.iterdir()} <= {"recipe.yaml", STATE_FILE}:
        shutil.rmtree(folder, ignore_errors=True)


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """Every local file or folder the recipe reads (itself, its model and the paths of
    :data:`PATH_KEYS`): the run folder must not be, contain or lie inside any of them."""
    values: dict[str, Any] = {"model": recipe.model, **recipe.sections}
    found = [recipe.path]
    for key_path in PATH_KEYS:
        value: Any = values
        for key in key_path:
            value = value.get(key) if isinstance(value, dict) else None
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and Path(item).expanduser().exists():
                found.append(Path(item).expanduser())
    return found
