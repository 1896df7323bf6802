"""The reproduction study: every metric x removal ratio x healing, on the real demo models.

    python benchmarks/study.py                       # the whole grid (resumable; see below for its cost)
    python benchmarks/study.py --models smollm2-135m --heals none   # one part of it

Each cell (model, metric, ratio, healing) is computed once and cached as JSON under
``$LAYERPRUNE_CACHE/study/``; a re-run skips finished cells, so the study can run in parts. After
every cell ``docs/RESULTS.md`` (or ``--results``) is rewritten from all cached cells, with the cells
not yet run marked as such, and the plots are redrawn in the ``figures/`` folder beside it. The full
grid is written beside the report as ``RESULTS-cells.csv`` (one row per cell) and committed: where a
model has no cached cells (a fresh machine), its rows come from that CSV, so ``--report-only``
re-renders the report, the CSV and the per-model figures without the cache. The report reads like a
results section: settings, one line per claim of docs/claims.md, one figure per model, then the
full grid and the claims in full in appendices.

Measured per cell: perplexity on the held-out wiki-sample test split (with its bootstrap interval),
the offline zero-shot tasks through lm-eval (accuracy with its standard error, stability =
agreement with the unpruned model's answers, and retained performance with a paired-bootstrap 95%
interval: ``--tasks lp_offline`` gives the four-task suite), and the FLOP-ideal and measured decode
speed-ups against the unpruned model. The healings are the trained ones (partial-ft, LoRA,
replace-layer) and the training-free repairs (replace-linear, rescale, merge) on the same rows.

Cost per cell on a 2-core x86 CPU (2026-11): SmolLM2 ~40 s unhealed, ~55 s partial-ft, ~55-130 s
LoRA, ~45-90 s replacement; Gemma-3-270M ~60-140 s unhealed, ~170-400 s partial-ft, ~140-320 s
LoRA, ~90-170 s replacement (its LM head of 262k tokens is trained, or back-propagated through, at
every step). Cells that choose the same layers as another metric are measured once. The whole grid
took 8.6 hours of cell time there (some of it beside other jobs), so it runs in parts: each run
continues where the last one stopped. SmolLM2: 2.5 h over 110 distinct cells. Gemma-3: 6.2 h over
100 distinct cells, 5.2 h of it healing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import io
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.data import build_calibration
from layerprune.evaluation.efficiency import Workload, measure_efficiency
from layerprune.evaluation.harness import run_tasks
from layerprune.evaluation.intervals import retained_difference, retained_performance
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.evaluation.stability import stability_by_task
from layerprune.models.aliases import MODEL_ALIASES
from layerprune.models.lineage import versions
from layerprune.outputs import write_bytes_atomic, write_json_atomic
from layerprune.scoring import ScoreReport, rescorer, score
from layerprune.selection import select

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "docs" / "claims.md"
MODELS = ("smollm2-135m", "gemma3-270m")
# metric name in the tables -> (scoring metric, selection strategy)
METRICS = {
    "bi": ("bi", "independent"), "angular": ("angular", "consecutive"), "block-cosine": ("block-cosine", "consecutive"),
    "reverse-order": ("reverse-order", "independent"), "random": ("random", "independent"),
    "magnitude-l1": ("magnitude-l1", "independent"), "magnitude-l2": ("magnitude-l2", "independent"),
    "taylor": ("taylor", "independent"), "ppl": ("ppl", "independent"), "bi-iterative": ("bi", "iterative"),
}
RATIOS = ("12%", "25%", "37%", "50%")
TRAINED = ("partial-ft", "lora", "replace-layer")
REPAIRS = ("replace-linear", "rescale", "merge")
"""The training-free repairs (ReplaceMe, Prune&Comp, LaCo), run through ``lp.heal`` on the healing
budget's rows (steps x rows windows of 128 tokens): the same data as the trained healers read."""
HEALS = ("none", *TRAINED, *REPAIRS)
# R8 is left out of the grid by default: its 8 answers over ~220-token stories cost ~10x the
# sentiment task per cell on this CPU; add it with --tasks where there is time.
TASKS = ("lp_sentiment_rt",)
HEAL_SEQ_LEN = 128
SPEED_WORKLOAD = Workload(prompt_len=64, new_tokens=32, repeats=3, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--metrics", default=",".join(METRICS))
    parser.add_argument("--ratios", default=",".join(RATIOS))
    parser.add_argument("--heals", default=",".join(HEALS))
    parser.add_argument("--samples", type=int, default=16, help="calibration rows for scoring")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=16, help="test-split windows scored (16 x 256 tokens)")
    parser.add_argument("--task-limit", type=int, default=100, help="examples per zero-shot task")
    parser.add_argument("--tasks", default=",".join(TASKS), help="offline zero-shot tasks run in every cell")
    parser.add_argument("--heal-steps", type=int, default=20, help="optimizer steps per healed cell")
    parser.add_argument("--heal-rows", type=int, default=4, help="rows of 128 tokens per healing step")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md",
                        help="the report to write; its figures go to the figures/ folder beside it")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the cache")
    return parser.parse_args(argv)


SETTINGS = ("samples", "seq_len", "ppl_windows", "task_limit", "tasks")


def replacement_applies(metric: str, removed: list[int] | None = None) -> bool:
    """Whether replacement can heal ``metric``'s cut: it must be one consecutive run of 2 or more
    layers (one layer in place of one is no replacement). ``removed`` unknown: judged by strategy."""
    return METRICS[metric][1] == "consecutive" and (removed is None or len(removed) >= 2)


def repair_applies(heal: str, removed: list[int] | None) -> bool:
    """Whether ``heal`` can repair the cut ``removed`` (unknown: assume so). replace-linear and merge
    fold into the layer kept before the cut, which a cut starting at layer 0 does not have."""
    return not (heal in ("replace-linear", "merge") and removed is not None and 0 in removed)


def study_dir(model: str) -> Path:
    """Cells live under a folder named by the measurement settings, so runs with other settings never
    mix. The healing budget is not in the name: unhealed cells do not depend on it, and a healed cell
    records its budget and is redone when the budget changes (see :func:`heal_budget`). A model given
    as a path or hub id gets a folder named after it, inside the cache, never the path itself."""
    tag = "-".join(f"{key}{getattr(ARGS, key)}" for key in SETTINGS)
    return cache_dir() / "study" / tag / file_stem(model)


def file_stem(model: str) -> str:
    """``model`` as one safe file name: an alias stays as it is, ``org/name`` becomes ``org_name``."""
    return re.sub(r"[^\w.-]+", "_", model).strip("_")


def reported_models(args: argparse.Namespace) -> list[str]:
    """The two study models always (a run over one of them keeps the other's tables), then any other
    model the run was given."""
    return list(dict.fromkeys([*MODELS, *(m for m in args.models.split(",") if m)]))


def heal_budget(args: argparse.Namespace) -> dict[str, int]:
    """What a healed cell was trained on; a cell healed on another budget is stale and redone."""
    return {"steps": args.heal_steps, "rows": args.heal_rows, "seq_len": HEAL_SEQ_LEN}


def heal_cell(pruned: lp.LoadedModel, heal: str, original: lp.LoadedModel, args: argparse.Namespace) -> lp.LoadedModel:
    """``pruned`` healed or repaired as a study cell is: seed 0, ``heal_steps`` x ``heal_rows`` windows of
    128 wiki-sample train tokens. A repair takes no steps, and ``heal`` would give it the calibration's
    row count; it is given the same rows as the healers train on, so both see the same data."""
    torch.manual_seed(0)
    rows = {"samples": args.heal_steps * args.heal_rows} if heal in REPAIRS else {}
    return lp.heal(pruned, heal, "wiki-sample", original=original, steps=args.heal_steps,
                   batch_size=args.heal_rows, seq_len=HEAL_SEQ_LEN, **rows)


def measure(loaded: lp.LoadedModel, args: argparse.Namespace, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Held-out perplexity and zero-shot accuracy (+ stability against ``reference``)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    with torch.no_grad():
        ppl = dataset_perplexity(model, tokenizer, "wiki-sample", args.seq_len, max_windows=args.ppl_windows)
        tasks = run_tasks(model, tokenizer, args.tasks.split(","), limit=args.task_limit, batch_size=8)
    cell = {"layers": loaded.num_layers, "removed": loaded.lineage.get("removed_layers", []),
            "ppl": ppl.ppl, "nll": ppl.nll, "ppl_tokens": ppl.tokens, "ppl_ci95": ppl.ci95,
            "accuracy": {task: values.get("acc") for task, values in tasks.metrics.items()},
            "stderr": {task: values.get("stderr") for task, values in tasks.metrics.items()},
            "chance": {task: values.get("chance") for task, values in tasks.metrics.items()},
            "predictions": tasks.predictions, "correct": tasks.correct}
    if reference is not None:
        cell["stability"] = stability_by_task(reference["predictions"], tasks.predictions)
        # cells of older runs stored no per-example correctness; RP needs a task the reference gets right
        if tasks.correct and any(sum(right) for right in reference.get("correct", {}).values()):
            cell["retained"] = retained_performance(reference["correct"], tasks.correct)
    return cell


def decode_speed(original: lp.LoadedModel, pruned: lp.LoadedModel) -> dict[str, Any]:
    """Measured and FLOP-ideal decode speed-up, the two models timed in turns in the same minute, so
    a shared machine's changing load hits both alike (timings from separate moments are noise here)."""
    with torch.no_grad():
        figures = measure_efficiency({"original": original.model, "pruned": pruned.model}, SPEED_WORKLOAD,
                                     disk=False, memory=False)["pruned"]
    return {"speedup": figures["decode_speedup"], "ideal_speedup": figures["decode_ideal_speedup"]}


class ModelRun:
    """One model's shared work: the original model, its unpruned measurement and all its scores."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.folder, self.args = name, study_dir(name), args
        self.original = lp.load_model(name)
        base_file = self.folder / "unpruned.json"
        if not base_file.exists():
            write_json_atomic(base_file, measure(self.original, args, None))
        self.base = json.loads(base_file.read_text())

    @functools.cached_property
    def calibration(self) -> Any:
        return build_calibration(self.original.tokenizer, "wiki-sample", samples=self.args.samples,
                                 seq_len=self.args.seq_len)

    @functools.cached_property
    def report(self) -> ScoreReport:
        """Every metric's scores, computed on first need (re-timing old cells needs none). They are
        merged into ``scores.json``, so a run over a few metrics keeps the others' profiles."""
        metrics = sorted({METRICS[m][0] for m in self.args.metrics.split(",") if m})
        report = score(self.original, self.calibration, metrics, batch_size=8)
        scores_file, document = self.folder / "scores.json", report.to_json()
        if scores_file.exists():
            kept = json.loads(scores_file.read_text())
            for key in ("metrics", "importance", "meaning", "details"):
                document[key] = {**kept.get(key, {}), **document.get(key, {})}
        write_json_atomic(scores_file, document)
        return report

    def complete_profiles(self) -> None:
        """Score every requested metric unless ``scores.json`` holds them all already: the importance
        figure draws them, even when every cell was finished by an earlier run."""
        scores_file = self.folder / "scores.json"
        wanted = {METRICS[m][0] for m in self.args.metrics.split(",") if m}
        if not scores_file.exists() or wanted - set(json.loads(scores_file.read_text())["importance"]):
            _ = self.report

    @functools.cached_property
    def selections(self) -> dict[str, list[int]]:
        """The layers of every requested (metric, ratio), chosen once after scoring and kept in
        ``selections.json``: a run restarted before its cells are done does not score again."""
        chosen_file = self.folder / "selections.json"
        chosen = json.loads(chosen_file.read_text()) if chosen_file.exists() else {}
        wanted = [(m, r) for m in self.args.metrics.split(",") if m for r in self.args.ratios.split(",")]
        if any(f"{m} {r}" not in chosen for m, r in wanted):
            for metric, ratio in wanted:
                scoring_metric, strategy = METRICS[metric]
                chosen.setdefault(f"{metric} {ratio}",
                                  select(self.report, ratio, strategy, scoring_metric,
                                         rescore=rescorer(self.original, self.calibration, batch_size=8)).remove)
            write_json_atomic(chosen_file, chosen)
        return chosen

    def removed_layers(self, metric: str, ratio: str) -> list[int]:
        """The layers ``metric`` removes at ``ratio``: a healed cell heals the unhealed cell's model,
        so it reads that cell's layers instead of choosing them again."""
        unhealed = self.folder / f"{metric}_{ratio.rstrip('%')}_none.json"
        if unhealed.exists():
            return json.loads(unhealed.read_text())["removed"]
        return self.selections[f"{metric} {ratio}"]

    def speed(self, metric: str, ratio: str, heal: str, pruned: lp.LoadedModel) -> dict[str, Any]:
        """Decode speed-up of ``pruned``. Partial-ft and LoRA (merged) keep the architecture of the
        unhealed cell, so they reuse its timing; a replacement adds a layer, so it is timed."""
        unhealed = self.folder / f"{metric}_{ratio.rstrip('%')}_none.json"
        if heal != "replace-layer" and unhealed.exists():
            timed = json.loads(unhealed.read_text())
            return {key: timed[key] for key in ("speedup", "ideal_speedup")}
        return decode_speed(self.original, pruned)

    def run_cell(self, metric: str, ratio: str, heal: str, args: argparse.Namespace) -> None:
        if heal == "replace-layer" and not replacement_applies(metric):
            return  # checked before the selection is read: it needs no scores
        cell_file = self.folder / f"{metric}_{ratio.rstrip('%')}_{heal}.json"
        budget = heal_budget(args) if heal != "none" else None
        if cell_file.exists() and json.loads(cell_file.read_text()).get("heal_budget") == budget:
            return
        remove = self.removed_layers(metric, ratio)
        if heal == "replace-layer" and not replacement_applies(metric, remove):
            return
        if not repair_applies(heal, remove):
            return
        twin = next((c for c in _cells(self.name).values()
                     if c["heal"] == heal and c.get("selected", c["removed"]) == remove
                     and c.get("heal_budget") == budget), None)
        if twin is not None:  # another metric chose the very same layers: the same model, measured once
            cell = {**twin, "metric": metric, "ratio": ratio, "same_as": twin.get("same_as") or twin["metric"]}
            write_json_atomic(cell_file, cell)
            return
        start = time.perf_counter()
        pruned = self.original.copy()
        lp.prune(pruned, remove, reason=f"{metric} {METRICS[metric][1]} {ratio}")
        if heal != "none":
            pruned = heal_cell(pruned, heal, self.original, args)
        cell = measure(pruned, args, self.base) | self.speed(metric, ratio, heal, pruned)
        # "selected": the layers chosen; a replacement's lineage lists one fewer as removed
        cell.update(metric=metric, ratio=ratio, heal=heal, heal_budget=budget, selected=remove,
                    seconds=round(time.perf_counter() - start, 1))
        write_json_atomic(cell_file, cell)
        print(f"{self.name} {metric} {ratio} {heal}: ppl {cell['ppl']:.1f} ({cell['seconds']} s)", flush=True)
        write_report(args)


def run_study(args: argparse.Namespace) -> None:
    """Cheapest and most telling cells first: every unhealed cell of every model (25%, the papers'
    headline ratio, first), then the healed ones at 25%, then the other ratios; so a study cut
    short leaves the most useful part finished."""
    runs: dict[str, ModelRun] = {}
    heals, ratios = args.heals.split(","), args.ratios.split(",")
    ordered = sorted(ratios, key=lambda r: r != "25%")
    passes = [("none", ordered)] if "none" in heals else []
    passes += [(heal, [ratio]) for ratio in ordered for heal in heals if heal != "none"]
    for heal, pass_ratios in passes:
        for name in args.models.split(","):
            runs.setdefault(name, ModelRun(name, args))
            for ratio in pass_ratios:
                for metric in (m for m in args.metrics.split(",") if m):
                    runs[name].run_cell(metric, ratio, heal, args)
        if heal == "none":
            for run in runs.values():
                run.complete_profiles()
    write_report(args)  # the last cells may have been twins, which do not rewrite the report themselves


def _cells(name: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    folder = study_dir(name)
    cells = {}
    for path in folder.glob("*_*_*.json"):
        cell = json.loads(path.read_text())
        cells[(cell["metric"], cell["ratio"], cell["heal"])] = cell
    return cells


Row = dict[str, Any]
"""One grid cell as the report shows it and the CSV holds it: the columns of :data:`CSV_COLUMNS`."""
Rows = dict[tuple[str, str, str], Row]
UNPRUNED = ("unpruned", "0%", "none")
"""The (metric, ratio, heal) key of a model's unpruned row: the baseline every cell is read against."""
CSV_COLUMNS = ("model", "metric", "ratio", "heal", "status", "same_as", "layers", "removed", "ppl", "ppl_tokens",
               "accuracy", "task_accuracy", "stability", "speedup", "ideal_speedup",
               "rp", "rp_low", "rp_high", "rp_gain", "rp_gain_low", "rp_gain_high")
"""The full grid's columns. ``status`` is "measured" or "n/a" (the healing does not apply to the cut);
accuracy and stability are means over the tasks (``task_accuracy`` lists each task's, where known);
rp is retained performance with its paired-bootstrap interval, rp_gain what the healing added to the
unhealed cut's RP (paired interval). Cells not run have no row."""
FLOAT_COLUMNS = frozenset({"ppl", "accuracy", "stability", "speedup", "ideal_speedup",
                           "rp", "rp_low", "rp_high", "rp_gain", "rp_gain_low", "rp_gain_high"})
INT_COLUMNS = frozenset({"layers", "ppl_tokens"})


def results_csv(results: Path) -> Path:
    """The full grid beside the report ``X.md``: ``X-cells.csv``. It is committed, so the report can be
    re-rendered where the cache of cells is gone (the grid took 8.6 h to measure)."""
    return results.with_name(f"{results.stem}-cells.csv")


def _row(name: str, key: tuple[str, str, str], **values: Any) -> Row:
    """A row with every column, those not given empty (None)."""
    return dict.fromkeys(CSV_COLUMNS) | dict(zip(("model", "metric", "ratio", "heal"), (name, *key))) | values


def cell_row(name: str, cell: dict[str, Any], base: dict[str, Any], unhealed: dict[str, Any] | None) -> Row:
    """A measured cell as a row: the JSON's per-task dictionaries reduced to the means the tables show,
    and the paired RP gain over ``unhealed`` computed here, while every example's answer is at hand
    (the CSV keeps no answers)."""
    key = (cell.get("metric", UNPRUNED[0]), cell.get("ratio", UNPRUNED[1]), cell.get("heal", UNPRUNED[2]))
    row = _row(name, key, status="measured", same_as=cell.get("same_as"), layers=cell["layers"],
               removed=cell.get("removed"), ppl=cell["ppl"], ppl_tokens=cell.get("ppl_tokens"),
               accuracy=_mean(cell["accuracy"]), task_accuracy=cell["accuracy"],
               stability=_mean(cell.get("stability", {})), speedup=cell.get("speedup"),
               ideal_speedup=cell.get("ideal_speedup"))
    if cell.get("retained"):
        row.update(rp=cell["retained"]["mean"], rp_low=cell["retained"]["ci95"][0], rp_high=cell["retained"]["ci95"][1])
    if key[2] != "none" and unhealed and unhealed.get("correct") and cell.get("correct") and base.get("correct"):
        gain = retained_difference(base["correct"], cell["correct"], unhealed["correct"])
        row.update(rp_gain=gain["mean"], rp_gain_low=gain["ci95"][0], rp_gain_high=gain["ci95"][1])
    return row


def cache_rows(name: str) -> Rows | None:
    """``name``'s rows from its cached cells (None where it has none): the unpruned row, every measured
    cell, and an "n/a" row for each healing that cannot apply to a finished unhealed cut."""
    base_file = study_dir(name) / "unpruned.json"
    if not base_file.exists():
        return None
    base, cells = json.loads(base_file.read_text()), _cells(name)
    rows = {UNPRUNED: cell_row(name, base, base, None)}
    for key, cell in cells.items():
        rows[key] = cell_row(name, cell, base, cells.get((key[0], key[1], "none")))
    for (metric, ratio, heal), cell in cells.items():
        if heal != "none":
            continue
        for other in ("replace-layer", *REPAIRS):
            applies = (replacement_applies(metric, cell["removed"]) if other == "replace-layer"
                       else repair_applies(other, cell["removed"]))
            if not applies and (metric, ratio, other) not in cells:
                rows[metric, ratio, other] = _row(name, (metric, ratio, other), status="n/a")
    return rows


def provenance(args: argparse.Namespace) -> dict[str, str]:
    """Where and how this run measured: the report's settings paragraph, kept in the CSV's header so
    a report re-rendered elsewhere states the measuring machine, not its own."""
    return {"date": dt.date.today().isoformat(), "machine": platform.machine(), "cores": str(os.cpu_count()),
            "python": platform.python_version(), "versions": ", ".join(f"{k} {v}" for k, v in versions().items()),
            **{key: str(getattr(args, key)) for key in (*SETTINGS, "heal_steps", "heal_rows")}}


def _csv_value(value: Any) -> str:
    """A row's value as CSV text: floats exactly (repr), layer lists space-separated, per-task
    accuracies as ``task=value; ...``, missing values empty; :func:`_parse_value` reads them back."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return "; ".join(f"{task}={'' if acc is None else repr(acc)}" for task, acc in value.items())
    return repr(value) if isinstance(value, float) else str(value)


def _parse_value(column: str, text: str) -> Any:
    """``column``'s CSV text back as the value the tables format (the inverse of :func:`_csv_value`)."""
    if text == "":
        return None
    if column in FLOAT_COLUMNS:
        return float(text)
    if column in INT_COLUMNS:
        return int(text)
    if column == "removed":
        return [int(layer) for layer in text.split()]
    if column == "task_accuracy":
        pairs = (item.split("=") for item in text.split("; "))
        return {task: float(acc) if acc else None for task, acc in pairs}
    return text


def write_cells_csv(path: Path, meta: dict[str, str], rows: dict[str, Rows]) -> None:
    """The full grid, one row per cell, under ``# key: value`` lines holding the settings (read it with
    ``pandas.read_csv(path, comment="#")``). Floats are written exactly (repr), so a re-render from
    the CSV prints what the cells would have."""
    buffer = io.StringIO()
    buffer.writelines(f"# {key}: {value}\n" for key, value in meta.items())
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for model_rows in rows.values():
        ordered = sorted(model_rows.values(), key=_grid_order)
        writer.writerows({column: _csv_value(row[column]) for column in CSV_COLUMNS} for row in ordered)
    write_bytes_atomic(path, buffer.getvalue().encode())


def _grid_order(row: Row) -> tuple[int, int, int]:
    """The unpruned row first, then metric, ratio and healing in the study's order: the CSV's rows do
    not depend on the order the cache's files are listed in, so a re-render diffs clean."""
    if row["metric"] == UNPRUNED[0]:
        return -1, 0, 0
    return list(METRICS).index(row["metric"]), RATIOS.index(row["ratio"]), HEALS.index(row["heal"])


def read_cells_csv(path: Path) -> tuple[dict[str, str], dict[str, Rows]]:
    """The settings and every model's rows of a CSV that :func:`write_cells_csv` wrote."""
    lines = path.read_text().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    rows: dict[str, Rows] = {}
    for record in csv.DictReader(line for line in lines if not line.startswith("#")):
        row = {column: _parse_value(column, record[column]) for column in CSV_COLUMNS}
        rows.setdefault(row["model"], {})[row["metric"], row["ratio"], row["heal"]] = row
    return meta, rows


def report_rows(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, Rows]]:
    """Every reported model's rows: from its cached cells where this machine has them, else from the
    committed CSV (a fresh machine has no cache; the study cannot be re-run there in reasonable
    time). A model with any cached cell is reported from its cache alone: a new measurement replaces
    the committed rows instead of mixing with rows measured elsewhere (git keeps the old CSV). The
    settings are this run's when any model came from the cache, else the CSV's."""
    stored_meta, stored = read_cells_csv(results_csv(args.results)) if results_csv(args.results).exists() else ({}, {})
    rows: dict[str, Rows] = {}
    measured_here = False
    for name in reported_models(args):
        cached = cache_rows(name)
        measured_here |= cached is not None
        if cached is not None or name in stored:
            rows[name] = cached if cached is not None else stored[name]
    return (provenance(args) if measured_here or not stored_meta else stored_meta), rows


def _measured(rows: Rows, key: tuple[str, str, str]) -> Row | None:
    row = rows.get(key)
    return row if row is not None and row["status"] == "measured" else None


def _cell_text(rows: Rows, metric: str, ratio: str, heal: str) -> str:
    """One table cell: its measurements, "—" while it has not run, "n/a" where its healing does not
    apply (a replacement with an unfinished unhealed cut is judged by the metric's strategy)."""
    row = rows.get((metric, ratio, heal))
    if row is None:
        return "n/a" if heal == "replace-layer" and not replacement_applies(metric) else "—"
    if row["status"] == "n/a":
        return "n/a"
    return (f"{row['ppl']:.4g} / {_fmt(row['accuracy'], '{:.3f}')} / {_fmt(row['stability'], '{:.2f}')} / "
            f"{row['speedup']:.2f}× ({row['ideal_speedup']:.2f}×)"
            + (f" / RP {_interval_text(row, 'rp', '{:.2f}')}" if row["rp"] is not None else "")
            + (f" = {row['same_as']}" if row["same_as"] else ""))


def healing_gain_table(rows: Rows, ratio: str) -> list[str]:
    """Metric x healing at one ratio: how much RP each healing adds to the unhealed cut, with the
    paired interval of that difference (the same examples resampled for the unpruned, the unhealed
    and the healed model). A healing "helps" only where the interval excludes 0; overlapping RP
    intervals alone cannot say so."""
    heals = [heal for heal in HEALS if heal != "none"]

    def entry(metric: str, heal: str) -> str | None:
        row = _measured(rows, (metric, ratio, heal))
        if row is None or row["rp_gain"] is None:
            return None
        separable = row["rp_gain_low"] > 0 or row["rp_gain_high"] < 0
        return _interval_text(row, "rp_gain", "{:+.2f}") + (" *" if separable else "")

    if not any(entry(metric, heal) for metric in METRICS for heal in heals):
        return []
    return [f"#### RP gained by healing at {ratio} (paired against the unhealed cut)", "",
            "Each cell: RP of the healed model minus RP of the same cut unhealed [paired-bootstrap 95% interval]; "
            "* = the interval excludes 0.", "",
            *_metric_by_healing(rows, ratio, heals, entry), ""]


def _metric_by_healing(rows: Rows, ratio: str, heals: list[str], entry: Callable[[str, str], str | None]) -> list[str]:
    """A metric x healing table at ``ratio``: ``entry(metric, heal)`` where it gives a text; else "—"
    for a cell of an older run (it kept no answers), or "—"/"n/a" for a cell not run."""
    lines = ["| metric | " + " | ".join(heals) + " |", "|---|" + "---|" * len(heals)]
    for metric in METRICS:
        row = []
        for heal in heals:
            text = entry(metric, heal)
            if text is None:
                text = "—" if _measured(rows, (metric, ratio, heal)) else _cell_text(rows, metric, ratio, heal)
            row.append(text)
        lines.append(f"| {metric} | " + " | ".join(row) + " |")
    return lines


def _interval_text(row: Row, column: str, pattern: str) -> str:
    """``row[column]`` with its interval (columns ``column_low``, ``column_high``), as "m [low, high]"."""
    low, high = row[f"{column}_low"], row[f"{column}_high"]
    return f"{pattern.format(row[column])} [{pattern.format(low)}, {pattern.format(high)}]"


def _mean(values: dict[str, float | None]) -> float | None:
    numbers = [v for v in values.values() if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "—" if value is None else pattern.format(value)


def model_tables(name: str, rows: Rows | None) -> str:
    """``name``'s full grid: a metric x ratio table per healing, then per ratio the healings side by
    side (RP) and what each adds to the unhealed cut."""
    if rows is None:
        return f"### {name}\n\nNot run yet.\n"
    base = rows[UNPRUNED]
    lines = [f"### {name}", "",
             f"Unpruned: {base['layers']} layers, held-out perplexity {base['ppl']:.2f} "
             f"({base['ppl_tokens']:,} tokens), zero-shot accuracy "
             + ", ".join(f"{t} {_fmt(a, '{:.3f}')}" for t, a in base["task_accuracy"].items()) + ".", ""]
    shown = [ratio for ratio in RATIOS if any(key[1] == ratio for key in rows)] or list(RATIOS)
    for heal in HEALS:
        lines += [f"#### Healing: {heal}", ""]
        if not any(_measured(rows, (m, r, heal)) for m in METRICS for r in shown):
            lines.append(f"No {heal} cell has run yet.\n")  # a table of dashes says no more
            continue
        lines += ["Each cell: held-out PPL / mean zero-shot accuracy / mean stability / decode speed-up "
                  "(measured, FLOP-ideal), then, where the cell kept every example's answer, retained performance "
                  "(RP: accuracy over the unpruned model's, averaged over tasks) with its paired-bootstrap 95% "
                  "interval; \"= m\": the same layers as metric m chose, measured once. — = not run yet"
                  + ("; n/a = does not apply: replacement needs a consecutive selection of 2 or more layers"
                     if heal == "replace-layer" else "")
                  + ("; n/a = does not apply: the cut starts at layer 0, so no kept layer precedes it to fold into"
                     if heal in ("replace-linear", "merge") else "") + ".", "",
                  "| metric | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for metric in METRICS:
            lines.append(f"| {metric} | " + " | ".join(_cell_text(rows, metric, ratio, heal) for ratio in shown) + " |")
        lines.append("")
    for ratio in shown:
        lines += retained_table(rows, ratio) + healing_gain_table(rows, ratio)
    return "\n".join(lines)


def retained_table(rows: Rows, ratio: str) -> list[str]:
    """Metric x healing at one ratio, each cell its retained performance with the interval, then its
    held-out perplexity: the one table that ranks the healings and repairs against each other.
    Empty where no cell of ``ratio`` kept its examples' answers (cells of older runs)."""
    if not any(row["rp"] is not None for key, row in rows.items() if key[1] == ratio):
        return []

    def entry(metric: str, heal: str) -> str | None:
        row = _measured(rows, (metric, ratio, heal))
        return f"{_interval_text(row, 'rp', '{:.2f}')} / {row['ppl']:.4g}" if row and row["rp"] is not None else None

    return [f"#### Retained performance at {ratio}, by healing", "",
            "Each cell: RP [95% interval] / held-out PPL; — = not run yet, n/a = the healing does not apply.", "",
            *_metric_by_healing(rows, ratio, list(HEALS), entry), ""]


def ratio_curves_name(name: str) -> str:
    return f"study-{file_stem(name)}-ratio-curves.png"


IMPORTANCE_FIGURE = "study-importance-profiles.png"


def ratio_figure(name: str, model_rows: Rows) -> Any | None:
    """Perplexity (top) and mean accuracy (bottom) of every metric's cut, by healing method.

    Over several removal ratios, one column per healing method (four to a row) with a curve per
    metric. At one ratio a curve would be a column of dots over meaningless ticks: the methods are
    then the categories of the x axis and the metrics sit side by side in each. A metric whose cells
    are another's (the same layers chosen: angular and block-cosine often are) is drawn hollow on top
    and its legend entry says so; the unpruned accuracy line is in the legend with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heals = [heal for heal in HEALS if any(_measured(model_rows, (m, r, heal)) for m in METRICS for r in RATIOS)]
    if not heals:
        return None
    ratios = [r for r in RATIOS if any(_measured(model_rows, (m, r, h)) for m in METRICS for h in heals)]
    points = {metric: [(r, h, row["ppl"], row["accuracy"]) for r in ratios for h in heals
                       if (row := _measured(model_rows, (metric, r, h)))] for metric in METRICS}
    labels: dict[str, str] = {}
    for metric, data in points.items():
        twin = next((other for other in labels if data and points[other] == data), None)
        labels[metric] = f"{metric} (= {twin}, drawn over it)" if twin else metric
    unpruned = model_rows[UNPRUNED]["accuracy"]
    with plt.rc_context({"font.size": 10}):
        if len(ratios) == 1:
            figure, axes = plt.subplots(2, 1, figsize=(11, 8), sharex=True, layout="constrained", squeeze=False)
            panels = [(axes[0][0], axes[1][0], heals)]
        else:
            per_row = min(len(heals), 4)
            rows = -(-len(heals) // per_row)
            figure, axes = plt.subplots(2 * rows, per_row, figsize=(3.8 * per_row, 3.4 * 2 * rows), sharey="row",
                                        layout="constrained", squeeze=False)
            panels = [(axes[2 * (i // per_row)][i % per_row], axes[2 * (i // per_row) + 1][i % per_row], [heal])
                      for i, heal in enumerate(heals)]
            for axis in axes.flat[len(heals) * 2:]:
                axis.set_visible(False)
        for top, bottom, shown in panels:
            for index, metric in enumerate(METRICS):
                data = [point for point in points[metric] if point[1] in shown]
                if not data:
                    continue
                hollow = "=" in labels[metric]
                style = {"marker": "o", "label": labels[metric], "markersize": 9 if hollow else 6,
                         "color": f"C{index % 10}",  # the same colour for a metric in every panel and the legend
                         "markerfacecolor": "none" if hollow else None, "linestyle": "none" if len(ratios) == 1 else "-"}
                if len(ratios) == 1:  # categories: the methods; the metrics side by side in each
                    xs = [shown.index(h) + (index - len(METRICS) / 2) * 0.06 for _, h, _, _ in data]
                else:
                    xs = [int(r.rstrip("%")) for r, _, _, _ in data]
                top.plot(xs, [ppl for _, _, ppl, _ in data], **style)
                bottom.plot(xs, [accuracy for _, _, _, accuracy in data], **style)
            top.set(yscale="log", ylabel="held-out perplexity (log)",
                    title=f"at {ratios[0]} removed" if len(ratios) == 1 else f"healing: {shown[0]}")
            bottom.axhline(unpruned, color="grey", linestyle=":", label=f"unpruned accuracy ({unpruned:.2f})")
            bottom.set(ylabel="zero-shot accuracy (mean)")
            if len(ratios) == 1:
                bottom.set_xticks(range(len(shown)), shown)
                bottom.set_xlabel("healing or repair")
            else:
                for axis in (top, bottom):
                    axis.set_xticks([int(r.rstrip("%")) for r in ratios])
                    axis.set_xlabel("layers removed (%)")
        handles = {label: handle for axis in figure.axes for handle, label in zip(*axis.get_legend_handles_labels())}
        figure.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
        figure.suptitle(f"{name}: perplexity and accuracy" + (f" at {ratios[0]} removed, by healing method"
                                                               if len(ratios) == 1 else " vs removal ratio, by healing method"))
    return figure


def draw_figures(folder: Path, rows: dict[str, Rows]) -> None:
    """Draw each model's ratio figure from its rows (so a CSV suffices), and the models' importance
    profiles where the cache holds their scores (a fresh machine keeps the committed drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, model_rows in rows.items():
        figure = ratio_figure(name, model_rows)
        if figure is not None:
            figure.savefig(folder / ratio_curves_name(name), dpi=100)
            plt.close(figure)
    profiles = [(name, json.loads((study_dir(name) / "scores.json").read_text())) for name in rows
                if (study_dir(name) / "scores.json").exists()]
    if profiles:
        figure, axes = plt.subplots(2, len(profiles), figsize=(6 * len(profiles), 8), squeeze=False)
        for column, (name, scores) in enumerate(profiles):
            axis = axes[0][column]
            drawn: dict[str, list[float]] = {}
            for metric in ("bi", "block-cosine", "angular", "taylor", "magnitude-l2", "ppl"):
                values = scores["importance"].get(metric)
                if values:
                    if metric == "ppl":  # removing layer 0 costs orders of magnitude more than the rest
                        values, metric = [math.log(v) for v in values], "log ppl"
                    low, high = min(values), max(values)
                    scaled = [(v - low) / ((high - low) or 1) for v in values]
                    # bi is 1 - block-cosine's one-layer value: once scaled, the same line; say so, draw it hollow
                    twin = next((other for other, line in drawn.items() if np.allclose(line, scaled)), None)
                    axis.plot(scaled, marker="o" if twin else ".", markerfacecolor="none" if twin else None,
                              label=f"{metric} (= {twin}, drawn over it)" if twin else metric)
                    drawn[metric] = scaled
            axis.set(xlabel="layer", ylabel="importance (min-max scaled)", title=f"{name}: layer importance")
            axis.legend(fontsize=7)
            # What selection uses is the order: each metric's rank of every layer (0 = removed first).
            ranked = [m for m in dict.fromkeys(METRICS[k][0] for k in METRICS) if m in scores["importance"]]
            ranks = [sorted(range(len(values)), key=values.__getitem__) for values in
                     (scores["importance"][m] for m in ranked)]
            grid = [[order.index(layer) for layer in range(len(order))] for order in ranks]
            image = axes[1][column].imshow(grid, aspect="auto", cmap="viridis")
            axes[1][column].set(yticks=range(len(ranked)), yticklabels=ranked, xlabel="layer",
                                title=f"{name}: importance rank (0 = removed first)")
            figure.colorbar(image, ax=axes[1][column], fraction=0.04)
        figure.tight_layout()
        figure.savefig(folder / IMPORTANCE_FIGURE, dpi=110)
        plt.close(figure)


def claim_rows() -> list[list[str]]:
    """The cells of docs/claims.md's table, one list per paper: paper, main claim, verdict, headline
    number [interval], the numbers in full."""
    lines = CLAIMS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| paper |")) + 2
    table = [line for line in lines[start:] if line.startswith("| ")]
    return [[part.strip() for part in line.strip("| ").split(" | ")] for line in table]


def claims_section() -> list[str]:
    """One line per claim: what the paper says, our verdict and the number behind it. The evidence in
    full (docs/claims.md, written by hand from the tables and benchmarks) follows in the appendix."""
    lines = ["## Claims", "",
             "Each seed claim, the verdict on these two models and the measurement that decides it, with its "
             "95% interval where the evaluation gives one (RP: retained performance on the four-task offline suite, "
             "paired-bootstrap). The evidence behind each verdict is in the appendix.", "",
             "| paper | claim | verdict | supporting number [95% interval] |", "|---|---|---|---|"]
    lines += [f"| {paper} | {claim} | {verdict} | {headline} |" for paper, claim, verdict, headline, _ in claim_rows()]
    return lines + [""]


def write_report(args: argparse.Namespace) -> None:
    """The report, paper-like: settings, one line per claim, one figure per model, then the full grid
    in an appendix; and the grid as a CSV beside it, from which a machine without the cache re-renders
    it all (see :func:`report_rows`)."""
    meta, rows = report_rows(args)
    names = reported_models(args)
    folder = args.results.parent / "figures"
    draw_figures(folder, rows)
    write_cells_csv(results_csv(args.results), meta, rows)
    done = sum(1 for model_rows in rows.values() for key in model_rows if key != UNPRUNED and _measured(model_rows, key))
    models = "; ".join(f"`{name}` = {MODEL_ALIASES[name].description}" for name in names if name in MODEL_ALIASES)
    in_docs = args.results.resolve().parent == CLAIMS.parent
    header = [
        "# Reproduction study", "",
        f"Written by `python benchmarks/study.py` from cells measured up to {meta['date']} on {meta['machine']}, {meta['cores']} "
        f"cores shared with other jobs, Python {meta['python']}; versions: {meta['versions']}. Models: {models}: "
        "4-bit GGUF files de-quantized to float32, so every baseline here is the quantized model's, not the "
        "original checkpoint's.", "",
        f"Settings: calibration {meta['samples']} x {meta['seq_len']} tokens of wiki-sample train; perplexity on "
        f"the first {meta['ppl_windows']} windows of {meta['seq_len']} tokens of the held-out wiki-sample test split; "
        f"zero-shot tasks {meta['tasks']} (first {meta['task_limit']} examples each, through lm-eval); healing "
        f"{meta['heal_steps']} steps x {meta['heal_rows']} rows x {HEAL_SEQ_LEN} tokens of wiki-sample train (the "
        f"toolkit's default learning rates). Decode speed-ups: the pruned and the unpruned model decode in turns "
        f"(64-token prompt, 32 new tokens, median of 3 after a warm-up), so load changes hit both alike. Cells "
        f"finished: {done}.", "",
    ]
    claims = claims_section() if CLAIMS.exists() else []
    figures = [f"![{name}: perplexity and accuracy against the removal ratio](figures/{ratio_curves_name(name)})"
               for name in names if (folder / ratio_curves_name(name)).exists()]
    figures += [f"![layer importance profiles](figures/{IMPORTANCE_FIGURE})"] if (folder / IMPORTANCE_FIGURE).exists() else []
    appendix = ["## Appendix A: the full grid", "",
                f"Every cell, one row each, is in [{results_csv(args.results).name}]({results_csv(args.results).name}) "
                "(the report is rendered from it where the cells' cache is missing). Cells not run yet are marked —; "
                "the study is resumable and fills them on the next run.", "",
                *(model_tables(name, rows.get(name)) for name in names)]
    text = "\n".join(header + claims + ["## Figures", "", *figures, ""] + appendix + [""])
    if CLAIMS.exists() and in_docs:  # the claims in full: its heading becomes the appendix's
        text += "\n## Appendix B: the claims in full\n" + CLAIMS.read_text().split("\n", 1)[1]
    elif CLAIMS.exists():  # its links are relative to docs/: a report elsewhere points to it instead
        text += f"\nThe papers' claims in full, beside these measurements: {CLAIMS.relative_to(ROOT)} (also at the end of docs/RESULTS.md).\n"
    write_bytes_atomic(args.results, text.encode())


ARGS = argparse.Namespace()


def main() -> int:
    args = parse_args()
    ARGS.__dict__.update(vars(args))
    if not args.report_only:
        run_study(args)
    write_report(args)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
