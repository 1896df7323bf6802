"""Evolutionary search benchmark (issue 32): ``layerprune search --algorithm evolution`` against the heuristic
search and the cheap single-metric cuts at 25% whole layers (or, ``--granularity sublayer``, 25% of the decoder's
parameters in attention and MLP branches), each cut plain and repaired, read on held-out test text
(docs/benchmarks.md § Evolutionary search).

    nice -n 5 python benchmarks/evolution.py                                  # smollm2-135m, 20 min per search
    python benchmarks/evolution.py --models smollm2-135m,gemma3-270m --minutes 20
    python benchmarks/evolution.py --models smollm2-135m,gemma3-270m --granularity sublayer  # branches
    python benchmarks/evolution.py --render                                   # only rewrite the docs section

Per model, each step saved in ``$LAYERPRUNE_CACHE/bench-evolution/results.json`` once done, so a run cut
off resumes at the step it was in (a test reading: at the cut it was reading):

1. the searches: ``layerprune search --remove 25% --time-budget M --algorithm heuristic`` and the
   same with ``--algorithm evolution``, each the command a user types (a child process, loading
   included), one after the other, the 1-minute load average before each: the same wall-clock budget.
   Each ranks its cuts plain and with every training-free repair that applies, on the wiki-sample
   validation windows; from its ``search.json``, the best plain and the best repaired cut by that
   ranking (:func:`search_cuts.choose`);
2. ``cheap``: the cheap single-metric cuts (``bi``, ``angular``, ``block-cosine``, each its independent
   selection, i.e. ``layerprune prune --metric M``) on the searches' calibration rows, loading included;
3. ``cheap repairs``: each cheap cut with every training-free repair that accepts it, fitted on the same
   rows and read on the searches' validation windows; its repaired form is the repair with the lowest
   perplexity there (the test text is never read to choose);
4. the test reading: every cut, plain and repaired (a search's repaired cut rebuilt by the search's own
   :func:`cut` on its calibration rows), on text neither the calibration (train) nor the ranking
   (validation) read: wiki-sample test perplexity and the exact mean KL(original || cut) per predicted
   token, on the same windows as the original, and the ``lp_offline`` suite (``--task-limit`` examples per
   task), retained performance (RP) against the original with its paired-bootstrap 95% interval. A cut
   two rows share is read once.

Beside them, the evolution's work from its ``search.json`` trace: tokens forwarded per generation, and
the share of layer evaluations saved by the cached prefixes (against running every kept layer) and
by multi-stage selection, early stopping and the cache (against every contender on every batch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_cuts import (
    FORMS,
    NOT_RUN,
    Rebuilder,
    calibration_of,
    calibration_rows,
    candidate_of,
    choose,
    costed,
    environment,
    form_of,
    interval_text,
    load_average,
    task_reading,
)

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.data import CalibrationSet, text_prefix, token_stream
from layerprune.data.calibration import CalibrationConfig
from layerprune.errors import UsageError
from layerprune.evaluation.intervals import retained_difference, retained_performance
from layerprune.outputs import write_json_atomic
from layerprune.reporting.eval_tables import update_doc_section
from layerprune.searching.candidates import (
    Candidate,
    available_repairs,
    cut,
    plain_candidates,
    repair_statistics,
    repaired_candidates,
)
from layerprune.searching.config import SearchConfig
from layerprune.searching.ranking import DropRule, held_out_windows, rank, window_losses

MODELS = ("smollm2-135m", "gemma3-270m")
REMOVE = "25%"
CHEAP = ("bi", "angular", "block-cosine")
SEARCHES = {"heuristic": ("--algorithm", "heuristic"), "evolution": ("--algorithm", "evolution")}
"""Each search's flags, in the order they run (the heuristic first)."""
GRANULARITIES = ("layer", "sublayer")
"""What the searches and the cheap cuts remove: whole layers, or attention and MLP branches (a 25% budget of
the decoder's parameters; ``--granularity sublayer``, the evolution then over branches)."""
TABLE_ORDER = ("evolution", "heuristic")
"""The searches' rows in a table: the one under test first."""
CHEAP_REPAIRS = "cheap repairs"
EVAL_WINDOW = 256
EVAL_WINDOWS = 32
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RESULTS = cache_dir() / "bench-evolution" / "results.json"
"""Each model's steps as they finish (a run resumes at the first step missing)."""


def search_key(algorithm: str) -> str:
    """Where a search's step is saved in a model's results. The searches once ran with ``--no-repair`` and
    were saved under the bare algorithm name: that key is never read (and :func:`upgraded` drops it), so a
    search that ranked plain cuts only is not taken for one that ranked the repairs, and runs again."""
    return f"{algorithm} search"


def reading_step(task_limit: int) -> str:
    """Where the test readings are saved: apart for each ``--task-limit``, which RP depends on."""
    return f"readings, {task_limit} examples per task"


OLD_STEPS = ("heuristic", "evolution", "cuts", "held_out")
"""The steps of results saved before the searches ranked their repairs: searches run with ``--no-repair``,
plain cuts read on perplexity and KL only (no repaired cut, no RP)."""


def upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A model's saved results as this script reads them. An entry of the old format (:data:`OLD_STEPS`) keeps
    its budget and its cheap cuts (the same computation on the same rows, timed the same way) and loses the
    rest: its searches ranked no repair, its reading has neither repaired cuts nor RP, and its note and dates
    speak of those numbers. The next run computes what is then missing."""
    if not any(key in state for key in OLD_STEPS):
        return state
    return {key: value for key, value in state.items() if key in ("minutes", "cheap")}


# --- the steps ---

def run_search(model: str, out: Path, minutes: float, *flags: str) -> dict[str, Any]:
    """One ``layerprune search`` as typed (its repairs ranked, as by default), what the benchmark keeps of
    its ``search.json``."""
    subprocess.run([sys.executable, "-m", "layerprune.cli.main", "search", "--model", model, "--remove", REMOVE,
                    "--time-budget", f"{minutes:g}", "--out", str(out), "--overwrite", *flags], check=True)
    return summary(json.loads((out / "search.json").read_text()))


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the benchmark keeps of a ``search.json``: every candidate it ranked (the best plain and repaired
    are chosen from them when read, by :func:`search_cuts.choose` as it is then), what it left unranked or
    whose repair it refused and why, its calibration and ranking (what the cheap cuts are repaired on and
    chosen against), and the evolution's trace."""
    return {"seconds_inside": record["seconds"], "winner": record["winner_label"], "tried": record["candidates"],
            "unranked": [{"repair": c["repair"], "reason": c["reason"]} for c in record.get("not_tried") or []],
            "refused_repairs": [{"repair": s["repair"], "reason": s["reason"]}
                                for s in record.get("skipped_repairs") or []],
            "shortfall": record.get("shortfall"), "left_out": record.get("budget_left_out"),
            "metrics": record["metrics"], "calibration": record["calibration"], "ranking": record["ranking"],
            "evolution": record.get("evolution")}


def cheap_cuts(model: str, calibration: CalibrationConfig, granularity: str = "layer") -> dict[str, Any]:
    """Each cheap metric's independent selection on the searches' calibration rows (timed with the model's
    loading, as a search's wall-clock is): its layers, or at sub-layer granularity its candidate record
    (the branches it removes)."""
    loaded = lp.load_model(model)
    report = lp.score(loaded, calibration_rows(loaded, calibration), list(CHEAP), granularity=granularity)
    selections = {metric: lp.select(report, REMOVE, metric=metric) for metric in CHEAP}
    if granularity == "layer":
        return {"cuts": {metric: selection.remove for metric, selection in selections.items()}}
    return {"cuts": {metric: plain_candidates([selection])[0].to_json() for metric, selection in selections.items()}}


def cheap_candidate(metric: str, saved: list[int] | dict[str, Any]) -> Candidate:
    """A cheap cut as saved by :func:`cheap_cuts`: its layers, or its candidate record."""
    return Candidate(list(saved), metric, "independent") if isinstance(saved, list) else candidate_of(saved)


def ranking_windows(original: lp.LoadedModel, found: dict[str, Any]) -> list[torch.Tensor]:
    """The held-out windows a search ranked its cuts on (its ``search.json``'s ``ranking``)."""
    ranking = found["ranking"]
    stream = token_stream(original.tokenizer, ranking["source"], ranking["split"],
                          found["calibration"].get("text_field"))
    return held_out_windows(stream, ranking["seq_len"], text_prefix(original.tokenizer), ranking["windows"])


def validation_ppl(loaded: lp.LoadedModel, windows: list[torch.Tensor]) -> float:
    """Perplexity on the searches' ranking windows, computed as a search ranks (never dropped early), so
    it stands beside the searched cuts' ranking perplexities."""
    first = max(len(text_prefix(loaded.tokenizer)), 1)
    return rank(window_losses(loaded.model, windows, SearchConfig().batch_size, first), DropRule(factor=0), None).ppl


def cheap_repairs(original: lp.LoadedModel, cuts: dict[str, Any], rows: CalibrationSet,
                  windows: list[torch.Tensor]) -> dict[str, Any]:
    """Per cheap cut, its validation perplexity plain and with each training-free repair that accepts it
    (a refusal with the method's reason), and the repair chosen: the lowest there. Only the validation
    windows are read, the text the searches choose on, never the test text every cut is judged on. A cut
    two metrics share (bi and block-cosine often agree) is repaired and read once."""
    batch_size = SearchConfig().batch_size
    chosen = {metric: cheap_candidate(metric, saved) for metric, saved in cuts.items()}
    distinct = {candidate.key: candidate for candidate in chosen.values()}
    repaired, refused = repaired_candidates(original, list(distinct.values()), available_repairs(), rows.tokens)
    statistics = repair_statistics(original, repaired, rows, batch_size)
    found: dict[Any, dict[str, Any]] = {
        key: {"plain_ppl": validation_ppl(cut(original, candidate, None, batch_size), windows),
              "validation_ppl": {}, "refused": {}} for key, candidate in distinct.items()}
    for refusal in refused:
        found[candidate_of(refusal).key]["refused"][refusal["repair"]] = refusal["reason"]
    for candidate in repaired:
        choice = found[candidate.key]
        try:
            working = cut(original, candidate, rows, batch_size, statistics)
        except UsageError as refusal:  # a repair that refuses its data (a singular system), as a search records it
            choice["refused"][candidate.repair] = str(refusal)
            continue
        choice["validation_ppl"][candidate.repair] = validation_ppl(working, windows)
    for choice in found.values():
        choice["repair"] = min(choice["validation_ppl"], key=choice["validation_ppl"].__getitem__, default=None)
    return {"cuts": {metric: found[candidate.key] for metric, candidate in chosen.items()}}


@dataclass
class Row:
    """One line of a model's table: a cut to read (a candidate record, as ``search.json`` writes one), or
    why there is none; what chose it (its validation perplexity) and the wall-clock of finding it."""

    group: str
    """``evolution`` or ``heuristic`` (a search's cut), else the cheap cut's metric."""
    form: str
    record: dict[str, Any] | None
    validation_ppl: float | None
    seconds: float
    why_none: str = ""

    @property
    def searched(self) -> bool:
        return self.group in SEARCHES

    @property
    def label(self) -> str:
        if not self.searched:
            return f"{self.group} (independent), {self.form}"
        label = f"{self.group} winner, {self.form}"
        if self.record is None:
            return label
        label += f" ({self.record['metric']}/{self.record['strategy']})"
        return label + (" (dropped early by the search: its ranking ppl is a running value)"
                        if self.record["dropped_early"] else "")


def unchosen(found: dict[str, Any], form: str) -> str:
    """Why a search has no cut of ``form`` to read: the time budget left them unranked, or (a repaired one)
    the search refused every repair."""
    unranked = [u for u in found["unranked"] if form_of(u) == form]
    if unranked:
        return f"none ranked ({len(unranked)} left unranked: {unranked[0]['reason']})"
    if form == FORMS[1] and found["refused_repairs"]:
        return f"none ranked (repairs refused: {found['refused_repairs'][0]['reason']})"
    return "none ranked"


def table_rows(state: dict[str, Any]) -> list[Row]:
    """The rows the saved steps name: each search's best plain and repaired cut, then each cheap cut plain
    and (once its repair is chosen) repaired. A cheap cut's wall-clock is the cheap step's (the three
    metrics scored together), its repaired form's that and the cheap repairs step's (every cut, every repair)."""
    rows = []
    for algorithm in TABLE_ORDER:
        found = state.get(search_key(algorithm))
        if found is None:
            continue
        chosen = choose(found["tried"], slot=form_of)
        rows += [Row(algorithm, form, chosen.get(form), chosen[form]["held_out_ppl"] if form in chosen else None,
                     found["seconds"], "" if form in chosen else unchosen(found, form)) for form in FORMS]
    cheap, repairs = state.get("cheap"), state.get(CHEAP_REPAIRS)
    for metric, saved in (cheap or {}).get("cuts", {}).items():
        plain = cheap_candidate(metric, saved).to_json()
        choice = repairs["cuts"][metric] if repairs else None
        rows.append(Row(metric, FORMS[0], plain, choice["plain_ppl"] if choice else None, cheap["seconds"]))
        if choice is not None:
            repair = choice["repair"]
            refusals = "; ".join(f"{name}: {why}" for name, why in choice["refused"].items())
            rows.append(Row(metric, FORMS[1], {**plain, "repair": repair} if repair else None,
                            choice["validation_ppl"].get(repair), cheap["seconds"] + repairs["seconds"],
                            "" if repair else f"no repair applied ({refusals})"))
    return rows


def reading_key(record: dict[str, Any]) -> str:
    """A cut's test reading is saved by what it removes and its repair, so a cut two rows share (bi and
    block-cosine often select the same layers; both searches may find one) is read once. Both searches
    are typed with the same (default) data flags and the cheap cuts are repaired on those rows, so one
    cut with one repair is one model."""
    candidate = candidate_of(record)
    return candidate.removed + (f" + {candidate.repair}" if candidate.repair else "")


def planned_reads(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each distinct cut the table's rows name, by :func:`reading_key`."""
    return {reading_key(row.record): row.record for row in table_rows(state) if row.record is not None}


def missing_steps(state: dict[str, Any], task_limit: int) -> list[str]:
    """The steps ``state`` lacks, in the order they run; the test reading is done once the original and
    every cut the earlier steps name are read."""
    missing = [key for key in (*map(search_key, SEARCHES), "cheap", CHEAP_REPAIRS) if key not in state]
    readings = state.get(reading_step(task_limit), {})
    if missing or any(key not in readings for key in ("original", *planned_reads(state))):
        missing.append(reading_step(task_limit))
    return missing


def text_reading(original: lp.LoadedModel, working: lp.LoadedModel, windows: list[torch.Tensor]) -> dict[str, float]:
    """Test perplexity of ``working`` and its mean KL(original || working) per predicted token, on the same
    windows. The original's distributions are computed again beside each cut rather than kept for all of
    them: a vocabulary of floats per token (Gemma's 262,144) would take gigabytes."""
    first = max(len(text_prefix(original.tokenizer)), 1)
    nll = kl = 0.0
    positions = 0
    with torch.inference_mode():
        for start in range(0, len(windows), 4):
            batch = torch.stack(windows[start:start + 4])
            targets = batch[:, first:]
            reference = torch.log_softmax(original.model(input_ids=batch).logits[:, first - 1:-1].float(), dim=-1)
            log_q = reference if working is original else torch.log_softmax(
                working.model(input_ids=batch).logits[:, first - 1:-1].float(), dim=-1)
            nll += float(-log_q.gather(-1, targets[..., None]).sum())
            kl += float((reference.exp() * (reference - log_q)).sum())
            positions += targets.numel()
    return {"ppl": round(math.exp(nll / positions), 3), "kl": round(kl / positions, 5)}


def read_cut(rebuild: Rebuilder, record: dict[str, Any], windows: list[torch.Tensor], task_limit: int,
             reference: dict[str, Any]) -> dict[str, Any]:
    """One cut rebuilt as its finder built it and read on the test text, its RP against the original's."""
    working = rebuild(record)
    got = {**text_reading(rebuild.original, working, windows), **task_reading(working, task_limit)}
    return {**got, "retained": retained_performance(reference["correct"], got["correct"])}


def read_all(rebuild: Rebuilder, state: dict[str, Any], task_limit: int, save: Callable[[], None]) -> None:
    """The original and every planned cut not yet read, each saved as it is done."""
    original = rebuild.original
    readings = state.setdefault(reading_step(task_limit), {})
    windows = held_out_windows(token_stream(original.tokenizer, "wiki-sample", "test"), EVAL_WINDOW,
                               text_prefix(original.tokenizer), EVAL_WINDOWS)
    if "original" not in readings:
        readings["original"] = costed(lambda: {**text_reading(original, original, windows),
                                               **task_reading(original, task_limit)})
        save()
    for key, record in planned_reads(state).items():
        if key not in readings:
            readings[key] = costed(partial(read_cut, rebuild, record, windows, task_limit, readings["original"]))
            save()


def results_key(model: str, granularity: str) -> str:
    """Where a model's steps at ``granularity`` are saved, and its docs heading: the model's name for whole
    layers (as before there was a choice), else with the granularity."""
    return model if granularity == "layer" else f"{model}, sub-layers"


def bench(model: str, minutes: float, task_limit: int, state: dict[str, Any],
          save: Callable[[], None], granularity: str = "layer") -> dict[str, Any]:
    """The steps not yet in ``state`` (saved after each by ``save``)."""
    folder = cache_dir() / "bench-evolution" / results_key(model, granularity).replace(", ", "-")
    state.setdefault("minutes", minutes)  # a run resumed with another budget starts again (main)
    for algorithm, flags in SEARCHES.items():
        if search_key(algorithm) not in state:
            state[search_key(algorithm)] = costed(partial(run_search, model, folder / algorithm, minutes, *flags,
                                                          "--granularity", granularity))
            save()
    # both searches are typed with the same data flags: the heuristic's record says the calibration of both
    heuristic = state[search_key("heuristic")]
    calibration = calibration_of(heuristic["calibration"])
    if "cheap" not in state:
        state["cheap"] = costed(partial(cheap_cuts, model, calibration, granularity))
        save()
    measuring = bool(missing_steps(state, task_limit))
    if measuring:
        rebuild = Rebuilder(lp.load_model(model), calibration)
        if CHEAP_REPAIRS not in state:
            windows = ranking_windows(rebuild.original, heuristic)
            state[CHEAP_REPAIRS] = costed(partial(cheap_repairs, rebuild.original, state["cheap"]["cuts"],
                                                  rebuild.rows(), windows))
            save()
        read_all(rebuild, state, task_limit, save)
    if measuring or "date" not in state:  # when and where the readings were finished
        state.update(date=dt.datetime.now(dt.UTC).isoformat(timespec="minutes"), load_after=load_average(),
                     **environment())
        save()
    return state


# --- the docs section, from what is saved ---

def work(evolution: dict[str, Any]) -> dict[str, Any]:
    """Tokens forwarded per generation and the shares of layer evaluations saved, from the trace."""
    trace = evolution["trace"]
    total = {key: sum(g[key] for g in trace) for key in ("tokens", "layer_tokens", "prefix_free_layer_tokens",
                                                         "naive_layer_tokens")}
    later = trace[1:]
    return {"generations": evolution["generations_run"], "stopped_by": evolution["stopped_by"],
            "initial_tokens": trace[0]["tokens"], "initial_seconds": trace[0]["seconds"],
            "tokens_per_generation": round(sum(g["tokens"] for g in later) / len(later)) if later else None,
            "seconds_per_generation": round(sum(g["seconds"] for g in later) / len(later), 1) if later else None,
            "improved": sum(g["improved"] for g in later),
            "saved_by_prefix": round(1 - total["layer_tokens"] / total["prefix_free_layer_tokens"], 3),
            "saved_by_stages_stops_cache": round(1 - total["prefix_free_layer_tokens"] / total["naive_layer_tokens"], 3),
            "saved_in_all": round(1 - total["layer_tokens"] / total["naive_layer_tokens"], 3),
            "best_heuristic_fitness": evolution["best_heuristic_fitness"],
            "best_fitness": trace[-1]["best_fitness"]}


def load_words(*loads: float) -> str:
    """What the load averages mean for a wall-clock budget, in words (the machine has few cores, so a
    load above one per core means each search got less of the CPU than an idle machine gives)."""
    cores = os.cpu_count() or 1
    if max(loads) <= cores / 2:
        return "; the machine was otherwise close to idle."
    return (f"; with {cores} cores, other work shared the machine (load up to {max(loads):g}), so a budget bought "
            "fewer generations and candidates than on an idle machine.")


def figure(value: Any, pattern: str, missing: str = NOT_RUN) -> str:
    """``value`` (a number, or a reading's fields by name) in ``pattern``; ``missing`` where there is none."""
    if value is None:
        return missing
    return pattern.format(**value) if isinstance(value, dict) else pattern.format(value)


def read_of(row: Row, readings: dict[str, Any]) -> dict[str, Any] | None:
    return readings.get(reading_key(row.record)) if row.record is not None else None


def removed_cell(record: dict[str, Any]) -> str:
    """What a cut removes: its layers (``2,4,8``), or with branches in words (``layers 2; MLP of 5,7``)."""
    if record["removed_attention"] or record["removed_mlp"]:
        return candidate_of(record).removed
    return ",".join(map(str, record["removed_layers"]))


def table(state: dict[str, Any], rows: list[Row], readings: dict[str, Any]) -> list[str]:
    original = readings.get("original")
    heuristic = state.get(search_key("heuristic"))
    ranked = heuristic["ranking"].get("original_ppl") if heuristic else None
    lines = [("| cut | removed layers | repair | ranking ppl (validation) | test ppl | KL to the original | RP [95%] "
              "| wall-clock (s) |"), "|---|---|---|---|---|---|---|---|",
             f"| original | none | | {figure(ranked, '{:.2f}', '')} | {figure(original, '{ppl:.2f}')} | 0 | 1 | |"]
    for row in rows:
        if row.record is None:
            lines.append(f"| {row.label} | {row.why_none} | | | | | | {row.seconds:.0f} |")
            continue
        got = read_of(row, readings)
        rp = interval_text(got["retained"]["mean"], got["retained"]["ci95"], "{:.3f}") if got else NOT_RUN
        lines.append(f"| {row.label} | {removed_cell(row.record)} "
                     f"| {row.record['repair'] or 'none'} | {figure(row.validation_ppl, '{:.2f}')} "
                     f"| {figure(got, '{ppl:.2f}')} | {figure(got, '{kl:.4f}')} | {rp} | {row.seconds:.0f} |")
    return lines


def work_text(heuristic: dict[str, Any], evolution: dict[str, Any]) -> str:
    w = work(evolution["evolution"])
    return (f"Evolution: {w['generations']} generations (ended by {w['stopped_by']}; "
            f"{w['improved']} improved the parent), the initial population {w['initial_tokens']:,} tokens "
            f"forwarded in {w['initial_seconds']:.0f} s, then "
            + (f"{w['tokens_per_generation']:,} tokens and {w['seconds_per_generation']} s per generation"
               if w["tokens_per_generation"] else "no generation")
            + f"; fitness (KL on calibration rows) {w['best_fitness']:.4f} against the best heuristic "
            f"selection's {w['best_heuristic_fitness']:.4f}. Layer evaluations saved: "
            f"{w['saved_by_prefix']:.0%} by the cached prefixes, {w['saved_by_stages_stops_cache']:.0%} by "
            f"multi-stage selection, early stopping and the cache, {w['saved_in_all']:.0%} in all. The "
            f"heuristic search ranked {len(heuristic['tried'])} candidate(s)"
            + (f" ({heuristic['shortfall']})" if heuristic["shortfall"] else "")
            + f", the evolution {len(evolution['tried'])}"
            + (f" ({evolution['shortfall']})" if evolution["shortfall"] else "") + ".")


def goal_text(rows: list[Row], readings: dict[str, Any]) -> str:
    """Issue 32's goal, on the plain cuts: the evolved cut at least 10% lower test perplexity than every
    cheap cut, and lower than the heuristic search's."""
    plain = {row.group: read_of(row, readings) for row in rows if row.form == FORMS[0]}
    if len(plain) < len(SEARCHES) + len(CHEAP) or None in plain.values():
        return f"Goal (issue 32), on the plain cuts: {NOT_RUN}."
    evolved, heuristic = plain["evolution"]["ppl"], plain["heuristic"]["ppl"]
    cheap_best = min(got["ppl"] for group, got in plain.items() if group not in SEARCHES)
    return (f"Goal (issue 32): the plain evolved cut at least 10% lower test perplexity than every cheap cut "
            f"({evolved:.2f} against {cheap_best:.2f}: {'met' if evolved <= 0.9 * cheap_best else 'not met'}) "
            f"and lower than the heuristic search's plain winner ({heuristic:.2f}: "
            f"{'met' if evolved < heuristic else 'not met'}).")


def difference_text(rows: list[Row], readings: dict[str, Any]) -> str:
    """The paired RP difference, evolution winner minus heuristic winner, plain and repaired."""
    parts = []
    for form in FORMS:
        pair = {row.group: row for row in rows if row.searched and row.form == form}
        got = {group: read_of(row, readings) for group, row in pair.items()}
        if len(pair) < len(SEARCHES):
            parts.append(f"{form} {NOT_RUN}")
        elif any(row.record is None for row in pair.values()):
            parts.append(f"{form} not compared (a search ranked no {form} cut)")
        elif None in got.values() or "original" not in readings:
            parts.append(f"{form} {NOT_RUN}")
        elif reading_key(pair["evolution"].record) == reading_key(pair["heuristic"].record):
            parts.append(f"{form} 0 (the same cut)")
        else:
            rp = retained_difference(readings["original"]["correct"], got["evolution"]["correct"],
                                     got["heuristic"]["correct"])
            says = ("the same within the interval" if rp["ci95"][0] <= 0 <= rp["ci95"][1]
                    else "higher for the evolution" if rp["mean"] > 0 else "higher for the heuristic search")
            parts.append(f"{form} {interval_text(rp['mean'], rp['ci95'], '{:+.3f}')}, {says}")
    return "RP difference, evolution winner minus heuristic winner (paired bootstrap, 95%): " + "; ".join(parts) + "."


def model_section(model: str, state: dict[str, Any], task_limit: int) -> list[str]:
    """One model's heading, its machine and loads, its table and the lines read from it."""
    searches = {algorithm: state.get(search_key(algorithm)) for algorithm in SEARCHES}
    heading = f"#### {model}" + (f", {state['minutes']:g} min per search" if "minutes" in state else "")
    if not any(searches.values()):
        return [heading, "", f"{NOT_RUN}.", ""]
    missing = missing_steps(state, task_limit)
    readings = state.get(reading_step(task_limit), {})
    rows = table_rows(state)
    h, e = searches["heuristic"], searches["evolution"]
    if missing:
        context = f"Steps {NOT_RUN} yet: {', '.join(missing)}."
    else:
        context = (f"{state['machine']}; {state['versions']}; {state['date']} UTC. 1-minute load average before the "
                   f"heuristic search {h['load_before']}, before the evolution {e['load_before']}, after the test "
                   f"reading {state['load_after']}"
                   + load_words(h["load_before"], e["load_before"], state["load_after"]))
    lines = [heading, "", context, "", *table(state, rows, readings), ""]
    if h and e:
        lines += [work_text(h, e), ""]
    lines += [goal_text(rows, readings), "", difference_text(rows, readings), ""]
    return lines + ([state["note"], ""] if state.get("note") else [])


def render(results: dict[str, dict[str, Any]], task_limit: int) -> str:
    lines = [(f"`layerprune search --remove {REMOVE} --time-budget M --algorithm heuristic` "
              "and the same with `--algorithm evolution`, each run as typed (a child process, loading included) "
              "one after the other, each ranking its cuts plain and with every training-free repair that applies "
              "on the wiki-sample validation windows; from each, the best plain and the best repaired cut by that "
              "ranking, rebuilt as the search built it. Beside them the cheap single-metric cuts (each of "
              f"{', '.join(CHEAP)}'s independent selection on the searches' calibration rows), plain and with the "
              "training-free repair, of those that apply, with the lowest perplexity on the same validation "
              "windows (the test text is never read to choose). Every cut is read on the wiki-sample test split "
              f"({EVAL_WINDOWS} windows of {EVAL_WINDOW} tokens; neither the calibration (train) nor the ranking "
              "(validation) reads it): perplexity and the exact mean KL (original || cut) per predicted token, and "
              f"the `lp_offline` suite ({task_limit} examples per task; RP = retained performance against the "
              "original, paired-bootstrap 95% interval). Wall-clock: a search's whole run; a cheap cut's loading, "
              "scoring and selection (the three metrics together), and for its repaired form also fitting and "
              "reading every repair of every cheap cut on validation. Produced by `python benchmarks/evolution.py`; "
              "steps not yet run say so."), ""]
    planned = [results_key(model, granularity) for granularity in GRANULARITIES for model in MODELS]
    for key in dict.fromkeys([*planned, *results]):
        lines += model_section(key, upgraded(results.get(key, {})), task_limit)
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--models", default=MODELS[0], help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--minutes", type=float, default=20.0, help="each search's --time-budget")
    parser.add_argument("--task-limit", type=int, default=40, help="lp_offline examples per task")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=GRANULARITIES[0],
                        help="what the searches and the cheap cuts remove: whole layers, or attention and MLP branches")
    parser.add_argument("--again", action="store_true", help="measure again from the first step")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the docs section from the cache")
    args = parser.parse_args(argv)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results: dict[str, Any] = {model: upgraded(state) for model, state in saved.items()}
    if not args.render:
        for model in args.models.split(","):
            key = results_key(model, args.granularity)
            if args.again or results.get(key, {}).get("minutes") not in (None, args.minutes):  # another budget
                results[key] = {}
            state = results.setdefault(key, {})
            bench(model, args.minutes, args.task_limit, state,
                  lambda: write_json_atomic(RESULTS, results, overwrite=True), args.granularity)
            print("\n".join(model_section(key, state, args.task_limit)), flush=True)
    if not args.no_doc:
        update_doc_section(DOC, "## Search", "### Evolutionary search", render(results, args.task_limit))
        print(f"wrote the Evolutionary search section of {DOC}")


if __name__ == "__main__":
    main()
