"""``layerprune.search``: the best smaller model for a layer or speed budget, and the front it came from.

    import layerprune as lp
    record = lp.search("smollm2-135m", remove=8, out="out/search")
    record.winner.label, record.winner.ppl

Steps, each sharing what it can with the others:

1. one calibration set, the cheap metrics scored in one :func:`layerprune.score` call (the
   similarity metrics share one forward pass), then each costly one (``ppl``, ``taylor``) while
   the time budget allows, leaving half of it to ranking (:func:`score_within_budget`,
   :data:`KEPT_FROM_COSTLY_METRICS`); a costly metric left out for that is scored after the ranking
   if the ranking left time enough, and its new cuts ranked then (:func:`late_costly_metrics`);
2. every metric's selection under every strategy, de-duplicated by the layers removed (the
   iterative selections share one re-scoring per smaller model; those of the ``costly`` metrics,
   ``ppl`` and ``taylor``, only with ``exhaustive``), then each distinct cut again with every
   training-free repair that accepts it (a cut of branches: ``rescale``, ``replace-linear``; a refusal
   is recorded with its reason); plain cuts first (whole-layer and sub-layer cuts in turns), then the
   repairs, cheapest first. With ``granularity`` ``sublayer`` the metrics that score branches score
   each attention and MLP apart and select branches to a parameter budget;
   with ``both`` those selections stand beside the whole-layer ones, at the parameters of the same
   number of whole layers (an evolution then runs over branches, seeded with both). A target
   speed-up decides that number on whole layers; each sub-layer cut's own speed-up is then timed
   and a cut short of the target is set aside, not ranked (:func:`.speed.sublayer_cuts_reaching`).
   With ``algorithm`` ``evolution`` (the default) these cuts seed an evolution of the removed set
   (:mod:`.evolution`), and its ``finalists`` best by fitness, each with its repairs, are the candidates;
3. each candidate scored on held-out windows (:mod:`.ranking`), dropped early when clearly worse;
   the repairs that read data take their statistics from one pass of the original over the
   calibration rows, for every run of every whole-layer candidate at once (:func:`.repair_statistics`;
   a repaired cut of branches reads its own pass);
4. the winner saved (healed with ``heal`` if asked), with ``search.json``, ``search.md``,
   ``pareto.png`` and a ``recipe.yaml`` that ``layerprune run`` replays to the same weights.

``time_budget`` bounds the whole run (:mod:`.budget`): each step is estimated before it starts and
left out, with a line saying so, when it would not fit; healing the winner, a step the user asks
for on top with its own size, is not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any


from layerprune.data import BUILTIN_CORPORA, HUB_CORPORA, calibrate, check_source, token_stream
from layerprune.data.calibration import DEFAULT_CALIBRATION, CalibrationConfig, text_prefix
from layerprune.errors import UsageError
from layerprune.evaluation.efficiency import TimedSpeedup, Workload
from layerprune.healing import HEALERS
from layerprune.healing import heal as heal_model
from layerprune.models.export import PLACEMENT, ExportConfig
from layerprune.models.lineage import count_parameters
from layerprune.models.loading import LoadedModel, load_model
from layerprune.options import refuse_unknown
from layerprune.outputs import check_output_path
from layerprune.progress import Progress
from layerprune.records import checked
from layerprune.repair import REPAIRS
from layerprune.scoring import METRICS, ScoreReport, rescorer, score
from layerprune.searching.candidates import (
    Candidate,
    available_repairs,
    candidate_metrics,
    cut,
    plain_candidates,
    repair_statistics,
    repaired_candidates,
    unique_selections,
)
from layerprune.searching.budget import TimeBudget
from layerprune.searching.config import SearchConfig
from layerprune.searching.evolution import branch_budget, evolved_candidates, layer_budget
from layerprune.searching.ranking import DropRule, held_out_windows, rank, window_losses
from layerprune.searching.record import SearchDocument
from layerprune.searching.report import write_search
from layerprune.searching.speed import (
    SEARCH_WORKLOAD,
    Shape,
    decode_speedup,
    layers_for_speedup,
    sublayer_cuts_reaching,
)
from layerprune.selection import Selection, parameter_budget, parse_remove

HELD_OUT_SPLITS = ("validation", "test")
KEPT_FROM_COSTLY_METRICS = 0.5
"""The share of a time budget (what is left after loading and the original's ranking) that the costly
metrics (``ppl``, ``taylor``, and the iterative selections) must leave to what uses their cuts: ranking
them, or an evolution's generations and finalists. Without it a costly metric fits whenever it ends
inside the budget, and on a CPU can leave nothing else: Gemma-3 at 20 minutes, both granularities,
spent them scoring and ranked 1 of 52 candidates; SmolLM2's evolution at 20 minutes spent 9 of them on
``ppl`` and ran 4 generations (docs/benchmarks.md § Sub-layers, § Evolutionary search)."""
OUT_OF_TIME = "the time budget ran out before it"
log = logging.getLogger(__name__)


@dataclass
class Tried:
    """A candidate and what ranking it found (``ppl`` is a lower bound when ``dropped``)."""

    candidate: Candidate
    ppl: float
    tokens: int
    windows: int
    dropped: bool
    parameters: int
    speed: TimedSpeedup
    """Decode speed-up over the original, timed in turns (shared by every candidate of the same depth)."""
    seconds: float

    @property
    def label(self) -> str:
        return self.candidate.label

    def to_json(self) -> dict[str, Any]:
        return {**self.candidate.to_json(), "held_out_ppl": self.ppl, "held_out_tokens": self.tokens,
                "held_out_windows": self.windows, "dropped_early": self.dropped, "parameters": self.parameters,
                **speed_fields(self.speed), "seconds": round(self.seconds, 3)}


def speed_fields(speed: TimedSpeedup) -> dict[str, Any]:
    """A decode speed-up as ``search.json`` writes it beside a candidate."""
    return {"flop_ideal_decode_speedup": speed.ideal, "measured_decode_speedup": speed.measured,
            "measured_decode_speedup_ci95": speed.interval, "decode_speedup_turns": speed.turns,
            "decode_speedup_note": speed.note}


@dataclass
class SearchRecord:
    """What a search found: every candidate tried, the winner, and how the work was done (``search.json``)."""

    model: str
    num_layers: int
    remove: int
    tried: list[Tried]
    winner_index: int
    settings: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    not_tried: list[tuple[Candidate, str]] = field(default_factory=list)
    """Candidates meant to be ranked but not reached, each with why (the time budget, ``max_candidates``)."""
    budget_left_out: dict[str, str] = field(default_factory=dict)
    """Metrics and selections the time budget left out -> why."""
    seconds: float = 0.0
    out: Path | None = None
    short_of_target: list[tuple[Candidate, TimedSpeedup, str]] = field(default_factory=list)
    """Sub-layer candidates whose own decode speed-up fell short of the target speed-up: not ranked, each
    with the speed-up and why (in ``search.json`` among ``not_tried``)."""

    @property
    def winner(self) -> Tried:
        return self.tried[self.winner_index]

    @property
    def shortfall(self) -> str | None:
        """One sentence when the time budget cut the search short (fewer candidates ranked, or metrics
        not scored, than it meant to), said in the report, the figure and the exit line; else ``None``."""
        unranked = sum(reason == OUT_OF_TIME for _, reason in self.not_tried)
        if not unranked and not self.budget_left_out:
            return None
        meant = len(self.tried) + unranked
        parts = [f"ranked {len(self.tried)} of {meant} candidates"]
        metrics = [what.removeprefix("metric ") for what in self.budget_left_out if what.startswith("metric ")]
        if metrics:
            parts.append(f"metrics {', '.join(metrics)} not scored")
        return (f"time budget spent: {', '.join(parts)}; the winner is the best of what was ranked, "
                f"not of the whole search")

    def to_json(self) -> dict[str, Any]:
        """``search.json``, checked against :class:`SearchDocument` (with its ``format_version``)."""
        return checked(SearchDocument, {
            "model": self.model, "num_layers": self.num_layers, "remove": self.remove,
            "winner": self.winner_index, "winner_label": self.winner.label, **self.settings,
            "candidates": [tried.to_json() for tried in self.tried],
            "skipped_repairs": self.skipped,
            "not_tried": [{**candidate.to_json(), "reason": reason} for candidate, reason in self.not_tried]
            + [{**candidate.to_json(), **speed_fields(speed), "reason": reason}
               for candidate, speed, reason in self.short_of_target],
            "budget_left_out": self.budget_left_out or None, "shortfall": self.shortfall,
            "seconds": round(self.seconds, 1)})


def held_out_source(data: str | Path, split: str, rank_data: str | Path | None) -> tuple[str, str]:
    """Where ranking reads: ``rank_data`` (its train split), another split of ``data``, or a refusal
    for a local file, whose every split is the whole file (the windows used to score)."""

    if rank_data is not None:
        if Path(str(rank_data)).expanduser().resolve() == Path(str(data)).expanduser().resolve():
            SearchConfig.refuse("rank_data", "is the calibration file itself; rank on held-out text (another file)")
        check_source(rank_data)
        return str(rank_data), "train" if str(rank_data) in BUILTIN_CORPORA or str(rank_data) in HUB_CORPORA else split
    if str(data) in BUILTIN_CORPORA or str(data) in HUB_CORPORA:
        return str(data), next(s for s in HELD_OUT_SPLITS if s != split)
    SearchConfig.refuse("rank_data", f"is needed: the calibration data {data} is a local file, which has no "
                                     "held-out split; give other text to rank the candidates on")


def rank_queue(loaded: LoadedModel, queue: list[Candidate], calibration: Any, windows: list[Any], first: int, *,
               batch_size: int, drop_rule: DropRule, workload: Workload, budget: TimeBudget, pass_seconds: float,
               progress: bool | None, timed: dict[Shape, TimedSpeedup] | None = None,
               best: tuple[float, LoadedModel] | None = None, slowest: float = 0.0,
               ) -> tuple[list[Tried], tuple[float, LoadedModel], list[dict[str, Any]]]:
    """Cut, rank and time each candidate of ``queue`` in order until it ends or the time budget would
    not cover one more (the slowest so far, and a pass of ``pass_seconds`` for the repair statistics
    when they are still to collect; the first is always ranked, unless an earlier ranking gave the
    ``best`` cut and the ``slowest`` candidate's seconds); returns what was tried, the best perplexity
    and model (kept to be saved) and the repaired candidates whose repair refused its data (e.g. a
    singular system), with the reason.

    ``first`` is the first predicted position of a window (after the tokenizer's prefix). The
    repair statistics are collected when the first repaired candidate comes up, for all of them.
    ``timed``: speed-ups already timed, by shape (a target speed-up's check of the sub-layer cuts, or
    an earlier ranking).
    """
    speeds: dict[Shape, TimedSpeedup] = dict(timed or {})
    statistics: dict[tuple[int, int], Any] | None = None
    tried: list[Tried] = []
    refused: list[dict[str, Any]] = []
    bar = Progress("search", len(queue), unit="candidates", shown=progress is not False)
    for candidate in queue:
        collects = candidate.repair is not None and statistics is None
        slowest = max([slowest, *(t.seconds for t in tried)])
        if (tried or best) and not budget.allows(slowest + (pass_seconds if collects else 0)):
            break
        bar.note(f"trying {candidate.label}" + (f", best ppl {best[0]:.2f}" if best else ""))
        start = budget.elapsed
        if collects:
            statistics = repair_statistics(loaded, queue, calibration, batch_size)
        try:
            working = cut(loaded, candidate, calibration, batch_size, statistics)
        except UsageError as refusal:
            if candidate.repair is None:
                raise
            refused.append({"candidate": candidate, "record": {**candidate.to_json(), "reason": str(refusal)}})
            continue
        ranked = rank(window_losses(working.model, windows, batch_size, first), drop_rule, best[0] if best else None)
        depth = candidate.shape
        if depth not in speeds:  # speed depends on how many layers (and branches) run, not which (see .speed)
            speeds[depth] = decode_speedup(loaded.model, working.model, workload)
        tried.append(Tried(candidate, ranked.ppl, ranked.tokens, ranked.windows, ranked.dropped,
                           count_parameters(working.model), speeds[depth], budget.elapsed - start))
        if not ranked.dropped and (best is None or ranked.ppl < best[0]):
            best = (ranked.ppl, working)
        bar.update()
    bar.close()
    assert best is not None, "the first candidate is always ranked in full (nothing to compare it with)"
    return tried, best, refused


def granularities(asked: str) -> tuple[str, ...]:
    """The scorings a search of granularity ``asked`` (``layer``, ``sublayer`` or ``both``) makes."""
    return ("layer", "sublayer") if asked == "both" else (asked,)


def score_within_budget(loaded: LoadedModel, rows: Any, metrics: list[str], budget: TimeBudget,
                        scoring: dict[str, Any]) -> tuple[ScoreReport, float]:
    """Every metric's scores as far as the budget allows, and the seconds of one forward pass of the
    calibration rows (what the later steps' costs are estimated from).

    The cheap metrics are scored first, always and together (the similarity metrics share one pass);
    each costly one then only when its estimated cost (:meth:`Metric.forward_passes` times the pass
    just measured) fits what is left, cheapest first; a metric left out is said in one line.
    """
    cheap = [name for name in metrics if not METRICS.get(name).costly]
    began = budget.elapsed
    report = score(loaded, rows, cheap, **scoring)
    passes = len({METRICS.get(n).shared_pass or n for n in cheap if METRICS.get(n).forward_passes(loaded.num_layers)})
    pass_seconds = (budget.elapsed - began) / max(passes, 1)
    results = dict(report.results)
    costly = sorted((name for name in metrics if name not in results),
                    key=lambda name: costly_seconds(loaded, name, scoring, pass_seconds))
    for name in costly:
        estimate = costly_seconds(loaded, name, scoring, pass_seconds)
        if budget.allows(estimate):
            results.update(score(loaded, rows, [name], **scoring).results)
        else:
            budget.skip(f"metric {name}", estimate, log.warning)
    return with_results(report, results, metrics), pass_seconds


def costly_seconds(loaded: LoadedModel, metric: str, scoring: dict[str, Any], pass_seconds: float) -> float:
    """The estimated seconds of scoring ``metric`` (:meth:`Metric.forward_passes` times the decoder pass
    of ``pass_seconds``)."""
    # the pass timed runs the decoder only; a costly metric also runs the LM head, and removes one unit at
    # a time: two branches a layer at sub-layer granularity. Gemma-3's branch ppl, estimated as one decoder
    # pass per layer, took four times that, and the ranking's time with it.
    units = loaded.num_layers * (2 if scoring.get("granularity") == "sublayer" else 1)
    layers = loaded.adapter.decoder_layers(loaded.model)
    head_ratio = count_parameters(loaded.model.get_output_embeddings()) / sum(map(count_parameters, layers))
    return METRICS.get(metric).forward_passes(units, head_ratio) * pass_seconds


def with_results(report: ScoreReport, results: dict[str, Any], order: list[str]) -> ScoreReport:
    """``report`` holding ``results`` (metric -> its result), its metrics in the order of ``order``."""
    scored = [name for name in order if name in results]
    return replace(report, results={name: results[name] for name in scored},
                   config=report.config.model_copy(update={"metrics": tuple(scored)}))


def late_costly_metrics(loaded: LoadedModel, rows: Any, reports: dict[str, ScoreReport], budget: TimeBudget,
                        scoring: dict[str, Any], passes: dict[str, float], slowest: float,
                        ) -> Iterator[tuple[str, ScoreReport]]:
    """Each costly metric the budget left out while it kept time for ranking, cheapest first, scored now
    where it and the ranking of one more candidate (``slowest`` seconds) still fit: its granularity and a
    report of it alone (``reports`` takes its scores too). For a heuristic search that ranked every
    candidate with time to spare: ranking took less than the half it kept (SmolLM2 at 20 minutes ranked
    its 36 candidates in 8 and left ``ppl`` out)."""
    left = [(granularity, name) for granularity, report in reports.items()
            for name in candidate_metrics(granularity) if name not in report.results]
    cost = {(granularity, name): costly_seconds(loaded, name, {**scoring, "granularity": granularity}, passes[granularity])
            for granularity, name in left}
    for granularity, name in sorted(left, key=cost.__getitem__):
        if not budget.allows(cost[granularity, name] + slowest):
            budget.skip(f"metric {name}", cost[granularity, name] + slowest, log.info)
            continue
        log.warning(f"search: metric {name} scored after the ranking, which left {budget.seconds_left:.0f} s")
        late = score(loaded, rows, [name], **{**scoring, "granularity": granularity})
        budget.left_out.pop(f"metric {name}", None)
        ordered = candidate_metrics(granularity)
        reports[granularity] = with_results(reports[granularity], {**reports[granularity].results, **late.results},
                                            ordered)
        yield granularity, with_results(reports[granularity], late.results, ordered)


def found_again(candidate: Candidate, queue: list[Candidate]) -> bool:
    """Whether ``queue`` holds ``candidate``'s cut already (plain or repaired); its finders then join theirs."""
    same = [queued for queued in queue if queued.key == candidate.key]
    for queued in same:
        queued.also_found_by += [candidate.finder, *candidate.also_found_by]
    return bool(same)


def search(model: str | Path | LoadedModel, config: SearchConfig | None = None, *,
           calibration: CalibrationConfig = DEFAULT_CALIBRATION, metric_options: dict[str, Any] | None = None,
           heal_options: dict[str, Any] | None = None, out: str | Path | None = None, overwrite: bool = False,
           export_options: dict[str, Any] | None = None, workload: Workload = SEARCH_WORKLOAD, progress: bool | None = None,
           load_options: dict[str, Any] | None = None, **options: Any) -> SearchRecord:
    """Find the best cut of ``model`` for the budget ``config`` (a :class:`SearchConfig`, or its
    options as keywords, which override ``config``'s: ``remove=8``, ``target_speedup=1.3``...), and
    with ``out`` write the winner and the search's record there (see the module docstring).

    Every metric scores, and every repair fits, on ``calibration``; ranking reads held-out text
    (``rank_data``, or another split of the calibration source). ``metric_options`` are the
    metrics' own (:func:`layerprune.score`'s); ``heal_options`` are :func:`layerprune.heal`'s for
    healing the winner (``heal``) on the calibration source; ``export_options`` say how the winner is
    written (:func:`layerprune.save`'s ``format`` and ``max_shard_size``; its folder is ``out``'s
    ``model``). ``workload`` is what decode speed is timed on; ``progress``: ``False`` hides the
    progress over candidates (:mod:`layerprune.progress`).
    """

    if options or config is None:
        config = SearchConfig(**{**(config.model_dump() if config is not None else {}), **options})
    check_source(calibration.source, calibration.split)
    refuse_unknown(export_options or {}, [name for name in ExportConfig.model_fields if name not in PLACEMENT],
                   unit="the winner's export (its folder is out's model)")
    export = ExportConfig(**(export_options or {}))  # how the winner is written: refused before any work
    rank_source, rank_split = held_out_source(calibration.source, calibration.split, config.rank_data)
    if config.heal is not None:

        HEALERS.get(config.heal)
    model_folder = model.local_dir if isinstance(model, LoadedModel) else Path(str(model)).expanduser()
    protected = [model_folder] if model_folder is not None and Path(model_folder).exists() else []
    if out is not None:
        check_output_path(out, overwrite=overwrite, protected=protected)
    budget = TimeBudget(config.time_budget)  # loading counts: the budget is the whole run's
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **(load_options or {}))
    apart = loaded.adapter.sublayer_refusal()
    if config.granularity != "layer" and apart is not None:
        config.refuse("granularity", f"{config.granularity}: {apart}, so its attention and MLP cannot be removed "
                                     "apart; search with granularity layer")

    measured_at_count = None
    if config.target_speedup is not None:
        count, measured_at_count = layers_for_speedup(loaded, config.target_speedup, workload)
    else:
        count = parse_remove(config.removal, loaded.num_layers)
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    rows = calibrate(loaded.tokenizer, calibration, max_positions=max_positions)
    prefix = text_prefix(loaded.tokenizer)
    windows = held_out_windows(token_stream(loaded.tokenizer, rank_source, rank_split, calibration.text_field),
                               calibration.seq_len, prefix, config.rank_windows)

    batch_size, drop_rule = config.batch_size, config.drop_rule
    # the reference every candidate is read against (search.md, pareto.png): the uncut model, same windows
    ranking_began = budget.elapsed
    original_ppl = rank(window_losses(loaded.model, windows, batch_size, max(len(prefix), 1)), drop_rule, None).ppl
    rank_seconds = budget.elapsed - ranking_began  # a candidate's ranking costs about this (a cut runs fewer layers)
    scoring = {"batch_size": batch_size, **(metric_options or {})}
    reports: dict[str, ScoreReport] = {}
    selections: list[Selection] = []
    not_selected: dict[str, str] = {}
    pass_seconds = 0.0
    # both: a branch selection removes the parameters of the same whole layers as a layer selection
    branch_remove = count if config.granularity == "both" or config.removal is None else config.removal
    branch_target = None
    passes: dict[str, float] = {}  # each granularity's calibration pass, in seconds

    def selections_of(report: ScoreReport, granularity: str) -> tuple[list[Selection], dict[str, str]]:
        """The selections of ``report``'s metrics (see :func:`unique_selections`), the iterative ones while
        the budget allows."""
        at = {**scoring, "granularity": granularity}
        remove = count if granularity == "layer" else branch_remove
        # an iterative selection scores one smaller model per unit it removes but the last (two branches a layer)
        rescorings = (count if granularity == "layer" else 2 * count) - 1
        return unique_selections(report, remove, rescorer(loaded, rows, **at),
                                 lambda: not budget.allows(rescorings * passes[granularity]),
                                 exhaustive=config.exhaustive)

    # the costly metrics only while they leave part of the budget to ranking (or evolving) their cuts
    keep = KEPT_FROM_COSTLY_METRICS * budget.seconds_left if config.time_budget else 0.0
    stage = "the evolution's generations" if config.algorithm == "evolution" else "ranking the candidates"
    with budget.keeping(keep, stage):
        for granularity in granularities(config.granularity):
            at = {**scoring, "granularity": granularity}
            reports[granularity], passes[granularity] = score_within_budget(loaded, rows, candidate_metrics(granularity),
                                                                            budget, at)
            pass_seconds = pass_seconds or passes[granularity]  # the first scoring's pass: what later costs are estimated from
            made, not_made = selections_of(reports[granularity], granularity)
            selections += made
            not_selected.update(not_made)
            if granularity == "sublayer":
                branch_target = parameter_budget(branch_remove, loaded.num_layers,
                                                 reports[granularity].unit_parameters or {})
    heuristic = plain_candidates(selections)
    evolution = None
    timed: dict[Shape, TimedSpeedup] = {}
    if config.algorithm == "evolution":
        # the repairs a finalist gets: those that accept the seed that the most accept (a refused one costs nothing)
        accepting = max((repaired_candidates(loaded, [seed], available_repairs(), rows.tokens)[0] for seed in heuristic),
                        key=len, default=[]) if config.repairs else []
        repairs = len(accepting)
        reading = sum(REPAIRS.get(candidate.repair).needs_statistics for candidate in accepting)
        # the decode speed-up is timed once per shape, and every layer cut of the budget has the seeds' shape: time
        # it now, so that what the finalists' ranking will cost is measured, not guessed (on Gemma-3 it was 2 rankings)
        timing_began = budget.elapsed
        for seed in heuristic[:1]:  # a plain cut reads no calibration data
            timed[seed.shape] = decode_speedup(loaded.model, cut(loaded, seed, None, 1).model, workload)
        timing_seconds = budget.elapsed - timing_began
        branches = config.granularity != "layer"  # branch cuts differ in shape and collect their own statistics
        untimed_shapes = 1 if branches else 0  # per finalist

        def reserve(finalists: int) -> float:
            """Seconds to rank ``finalists`` cuts, each plain and with ``repairs`` repairs (per candidate, the
            original's ranking, measured), to time the speed-ups of shapes not yet timed and to collect the
            repairs' statistics: one pass for every cut of whole layers, one per repair that reads them for
            each cut of branches (about a calibration pass each)."""
            statistics_passes = finalists * reading if branches else min(reading, 1)
            return (finalists * ((1 + repairs) * rank_seconds + untimed_shapes * timing_seconds)
                    + statistics_passes * pass_seconds)

        if branch_target is None:
            units = layer_budget([count_parameters(layer) for layer in loaded.adapter.decoder_layers(loaded.model)],
                                 count)
        else:
            units = branch_budget(reports["sublayer"].unit_parameters or {}, branch_target)
        plain, evolution = evolved_candidates(loaded, rows, heuristic, units, config, budget, reserve, progress)
    else:
        plain = heuristic
    short_of_target: list[tuple[Candidate, TimedSpeedup, str]] = []
    if config.target_speedup is not None:
        plain, short_of_target, reached = sublayer_cuts_reaching(loaded, plain, config.target_speedup, workload,
                                                                 budget.allows)
        timed.update(reached)
        if not plain:
            fastest = max(speed.usable for _, speed, _ in short_of_target)
            config.refuse("target_speedup", f"{config.target_speedup:g} is out of reach of every sub-layer cut of "
                                            f"{count} layers' parameters (the fastest: {fastest:.2f}x); ask for "
                                            "less, or search with granularity layer or both")
    repaired, skipped = (repaired_candidates(loaded, plain, available_repairs(), rows.tokens) if config.repairs
                         else ([], []))
    queue = [*plain, *repaired]
    limit = len(queue) if config.max_candidates is None else config.max_candidates

    ranking = partial(rank_queue, loaded, calibration=rows, windows=windows, first=max(len(prefix), 1),
                      batch_size=batch_size, drop_rule=drop_rule, workload=workload, budget=budget,
                      pass_seconds=pass_seconds, progress=progress)
    tried, best, refused = ranking(queue[:limit], timed=timed)
    if config.algorithm == "heuristic" and limit == len(queue) == len(tried) + len(refused):
        # every candidate ranked with time to spare: the costly metrics left out for ranking come now
        for granularity, report in late_costly_metrics(loaded, rows, reports, budget, scoring, passes,
                                                       slowest=max(t.seconds for t in tried)):
            made, not_made = selections_of(report, granularity)
            not_selected.update(not_made)
            fresh = [c for c in plain_candidates(made) if not found_again(c, queue)]
            if config.target_speedup is not None:
                fresh, short, more_timed = sublayer_cuts_reaching(loaded, fresh, config.target_speedup, workload,
                                                                  budget.allows)
                short_of_target += short
                timed.update(more_timed)
            fixed, more_skipped = (repaired_candidates(loaded, fresh, available_repairs(), rows.tokens)
                                   if config.repairs else ([], []))
            skipped += more_skipped
            more, best, more_refused = ranking([*fresh, *fixed], best=best, slowest=max(t.seconds for t in tried),
                                               timed={**timed, **{t.candidate.shape: t.speed for t in tried}})
            queue += [*fresh, *fixed]
            tried += more
            refused += more_refused
        limit = len(queue)
    winner_model = best[1]
    winner_index = min((i for i, t in enumerate(tried) if not t.dropped), key=lambda i: (tried[i].ppl, i))
    settings = {
        "budget": {"remove": config.removal, "target_speedup": config.target_speedup,
                   "measured_decode_speedup_at_count": measured_at_count, "time_budget_minutes": config.time_budget,
                   "max_candidates": config.max_candidates, "branch_parameters": branch_target},
        "calibration": {**calibration.record(), "used_for": "scoring every metric and fitting every repair"},
        "ranking": {"source": rank_source, "split": rank_split, "seq_len": calibration.seq_len,
                    "windows": len(windows), "tokens": tried[winner_index].tokens, "original_ppl": original_ppl,
                    "held_out": "another split of the calibration source (split by document)"
                    if config.rank_data is None else "the rank_data text",
                    "drop_rule": f"dropped once, after {drop_rule.after} or more windows, the running perplexity "
                                 f"exceeds {drop_rule.factor:g}x the best final perplexity so far"},
        "metrics": list(dict.fromkeys(name for report in reports.values() for name in report.results)),
        "exhaustive": config.exhaustive,
        "selections_not_made": not_selected or None,
        "importance": {name: r.importance for name, r in reports["layer"].results.items()} if "layer" in reports
        else {},
        "branch_importance": {name: dict(zip(r.units or [], r.importance, strict=True))
                              for name, r in reports["sublayer"].results.items()} if "sublayer" in reports else None,
        "speed_workload": {"prompt_len": workload.prompt_len, "new_tokens": workload.new_tokens,
                           "repeats": workload.repeats},
        "heal": config.heal,
        "options": config,
        "algorithm": config.algorithm,
        "evolution": evolution,
    }
    done = [t.candidate for t in tried] + [refusal["candidate"] for refusal in refused]
    not_tried = [(c, OUT_OF_TIME) for c in queue[:limit] if c not in done]
    not_tried += [(c, "beyond max_candidates") for c in queue[limit:]]
    record = SearchRecord(loaded.source, loaded.num_layers, count, tried, winner_index, settings,
                          skipped + [refusal["record"] for refusal in refused], not_tried, budget.left_out,
                          budget.elapsed, short_of_target=short_of_target)
    if record.shortfall:
        log.warning(f"search: {record.shortfall}")
    if out is not None:

        source = str(model) if not isinstance(model, LoadedModel) else str(loaded.local_dir or loaded.source)
        if config.heal is not None:

            # a plain cut shares its weights with the original (the teacher): train an own copy
            winner_model = heal_model(winner_model.copy(), config.heal, calibration.source, original=loaded,
                                      **(heal_options or {}))
        record.out = write_search(record, winner_model, out, overwrite=overwrite, protected=protected,
                                  source=source, calibration=calibration.record(), batch_size=batch_size,
                                  metric_options=metric_options or {}, heal_options=heal_options or {},
                                  export=export)
    return record
