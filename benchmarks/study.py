"""The reproduction study: every metric x removal ratio x healing, on the real demo models.

    python benchmarks/study.py                       # the whole grid (resumable; see below for its cost)
    python benchmarks/study.py --models smollm2-135m --heals none   # one part of it

Each cell (model, metric, ratio, healing) is computed once and cached as JSON under
``$LAYERPRUNE_CACHE/study/``; a re-run skips finished cells, so the study can run in parts. After
every cell ``docs/RESULTS.md`` (or ``--results``) is rewritten from all cached cells, with the cells
not yet run marked as such, and the plots are redrawn in the ``figures/`` folder beside it.

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
import datetime as dt
import functools
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

import torch

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.data import build_calibration
from layerprune.evaluation.efficiency import Workload, measure_efficiency
from layerprune.evaluation.harness import run_tasks
from layerprune.evaluation.intervals import retained_difference, retained_performance
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.evaluation.stability import stability_by_task
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


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


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
            torch.manual_seed(0)
            pruned = lp.heal(pruned, heal, "wiki-sample", original=self.original, steps=args.heal_steps,
                             batch_size=args.heal_rows, seq_len=HEAL_SEQ_LEN)
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


def _cell_text(cells: dict[tuple[str, str, str], dict[str, Any]], metric: str, ratio: str, heal: str) -> str:
    """One table cell: its measurements, "—" while it has not run, "n/a" where its healing does not apply."""
    cell = cells.get((metric, ratio, heal))
    if cell is None and heal in ("replace-layer", *REPAIRS):
        unhealed = cells.get((metric, ratio, "none"))
        removed = unhealed["removed"] if unhealed else None
        applies = replacement_applies(metric, removed) if heal == "replace-layer" else repair_applies(heal, removed)
        return "—" if applies else "n/a"
    if cell is None:
        return "—"
    return (f"{cell['ppl']:.4g} / {_fmt(_mean(cell['accuracy']), '{:.3f}')} / "
            f"{_fmt(_mean(cell.get('stability', {})), '{:.2f}')} / "
            f"{cell['speedup']:.2f}× ({cell['ideal_speedup']:.2f}×)"
            + (f" / RP {_retained_text(cell['retained'])}" if cell.get("retained") else "")
            + (f" = {cell['same_as']}" if cell.get("same_as") else ""))


def healing_gain_table(cells: dict[tuple[str, str, str], dict[str, Any]], ratio: str,
                       base: dict[str, Any]) -> list[str]:
    """Metric x healing at one ratio: how much RP each healing adds to the unhealed cut, with the
    paired interval of that difference (the same examples resampled for the unpruned, the unhealed
    and the healed model). A healing "helps" only where the interval excludes 0; overlapping RP
    intervals alone cannot say so."""
    heals = [heal for heal in HEALS if heal != "none"]
    gains: dict[tuple[str, str], str] = {}
    for metric in METRICS:
        unhealed = cells.get((metric, ratio, "none"))
        for heal in heals:
            healed = cells.get((metric, ratio, heal))
            if unhealed and healed and unhealed.get("correct") and healed.get("correct") and base.get("correct"):
                gain = retained_difference(base["correct"], healed["correct"], unhealed["correct"])
                low, high = gain["ci95"]
                gains[metric, heal] = f"{gain['mean']:+.2f} [{low:+.2f}, {high:+.2f}]" + (" *" if low > 0 or high < 0 else "")
    if not gains:
        return []
    return [f"#### RP gained by healing at {ratio} (paired against the unhealed cut)", "",
            "Each cell: RP of the healed model minus RP of the same cut unhealed [paired-bootstrap 95% interval]; "
            "* = the interval excludes 0.", "",
            *_metric_by_healing(cells, ratio, heals, lambda metric, heal: gains.get((metric, heal))), ""]


def _metric_by_healing(cells: dict[tuple[str, str, str], dict[str, Any]], ratio: str, heals: list[str],
                       entry: Callable[[str, str], str | None]) -> list[str]:
    """A metric x healing table at ``ratio``: ``entry(metric, heal)`` where it gives a text; else "—"
    for a cell of an older run (it kept no answers), or "—"/"n/a" for a cell not run."""
    lines = ["| metric | " + " | ".join(heals) + " |", "|---|" + "---|" * len(heals)]
    for metric in METRICS:
        row = []
        for heal in heals:
            text = entry(metric, heal)
            if text is None:
                text = "—" if (metric, ratio, heal) in cells else _cell_text(cells, metric, ratio, heal)
            row.append(text)
        lines.append(f"| {metric} | " + " | ".join(row) + " |")
    return lines


def _retained_text(retained: dict[str, Any]) -> str:
    low, high = retained["ci95"]
    return f"{retained['mean']:.2f} [{low:.2f}, {high:.2f}]"


def _mean(values: dict[str, float]) -> float | None:
    numbers = [v for v in values.values() if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "—" if value is None else pattern.format(value)


def model_tables(name: str) -> str:
    base_file = study_dir(name) / "unpruned.json"
    if not base_file.exists():
        return f"### {name}\n\nNot run yet.\n"
    base = json.loads(base_file.read_text())
    cells = _cells(name)
    lines = [f"### {name}", "",
             f"Unpruned: {base['layers']} layers, held-out perplexity {base['ppl']:.2f} "
             f"({base['ppl_tokens']:,} tokens), zero-shot accuracy "
             + ", ".join(f"{t} {_fmt(a, '{:.3f}')}" for t, a in base["accuracy"].items()) + ".", ""]
    shown = [ratio for ratio in RATIOS if any(key[1] == ratio for key in cells)] or list(RATIOS)
    for heal in HEALS:
        rows = [(m, r) for m in METRICS for r in shown if (m, r, heal) in cells]
        lines += [f"#### Healing: {heal}", "",
                  "Each cell: held-out PPL / mean zero-shot accuracy / mean stability / decode speed-up "
                  "(measured, FLOP-ideal), then, where the cell kept every example's answer, retained performance "
                  "(RP: accuracy over the unpruned model's, averaged over tasks) with its paired-bootstrap 95% "
                  "interval; \"= m\": the same layers as metric m chose, measured once. — = not run yet"
                  + ("; n/a = does not apply: replacement needs a consecutive selection of 2 or more layers"
                     if heal == "replace-layer" else "")
                  + ("; n/a = does not apply: the cut starts at layer 0, so no kept layer precedes it to fold into"
                     if heal in ("replace-linear", "merge") else "") + ".", "",
                  "| metric | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for metric in METRICS:
            row = [_cell_text(cells, metric, ratio, heal) for ratio in shown]
            lines.append(f"| {metric} | " + " | ".join(row) + " |")
        lines.append("")
        if not rows:
            lines.append(f"No {heal} cell has run yet.\n")
    for ratio in shown:
        lines += retained_table(cells, ratio) + healing_gain_table(cells, ratio, base)
    return "\n".join(lines)


def retained_table(cells: dict[tuple[str, str, str], dict[str, Any]], ratio: str) -> list[str]:
    """Metric x healing at one ratio, each cell its retained performance with the interval, then its
    held-out perplexity: the one table that ranks the healings and repairs against each other.
    Empty where no cell of ``ratio`` kept its examples' answers (cells of older runs)."""
    if not any(cell.get("retained") for key, cell in cells.items() if key[1] == ratio):
        return []
    def entry(metric: str, heal: str) -> str | None:
        cell = cells.get((metric, ratio, heal))
        return f"{_retained_text(cell['retained'])} / {cell['ppl']:.4g}" if cell and cell.get("retained") else None

    return [f"#### Retained performance at {ratio}, by healing", "",
            "Each cell: RP [95% interval] / held-out PPL; — = not run yet, n/a = the healing does not apply.", "",
            *_metric_by_healing(cells, ratio, list(HEALS), entry), ""]


def draw_figures(folder: Path, names: list[str]) -> list[str]:
    """Draw the ratio curves of every model in ``names`` and their importance profiles into
    ``folder``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        cells = _cells(name)
        if not cells:
            continue
        figure, axes = plt.subplots(2, len(HEALS), figsize=(4.2 * len(HEALS), 7), sharex=True,
                                 sharey="row", squeeze=False)
        for column, heal in enumerate(HEALS):
            for metric in METRICS:
                done = [(int(r.rstrip("%")), cells[(metric, r, heal)]) for r in RATIOS if (metric, r, heal) in cells]
                if done:
                    ratios = [ratio for ratio, _ in done]
                    axes[0][column].plot(ratios, [cell["ppl"] for _, cell in done], marker="o", label=metric)
                    axes[1][column].plot(ratios, [_mean(cell["accuracy"]) for _, cell in done], marker="o",
                                         label=metric)
            axes[0][column].set(title=f"healing: {heal}", yscale="log", ylabel="held-out perplexity (log)")
            axes[1][column].set(xlabel="layers removed (%)", ylabel="zero-shot accuracy (mean)")
            axes[1][column].axhline(_mean(json.loads((study_dir(name) / "unpruned.json").read_text())["accuracy"]),
                                    color="grey", linestyle=":", label="unpruned")
        axes[0][0].legend(fontsize=7, ncol=2)
        figure.suptitle(f"{name}: perplexity and accuracy vs removal ratio, by healing method")
        figure.tight_layout()
        path = folder / f"study-{file_stem(name)}-ratio-curves.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path.name)
    profiles = [(name, json.loads((study_dir(name) / "scores.json").read_text())) for name in names
                if (study_dir(name) / "scores.json").exists()]
    if profiles:
        figure, axes = plt.subplots(2, len(profiles), figsize=(6 * len(profiles), 8), squeeze=False)
        for column, (name, scores) in enumerate(profiles):
            axis = axes[0][column]
            for metric in ("bi", "block-cosine", "angular", "taylor", "magnitude-l2", "ppl"):
                values = scores["importance"].get(metric)
                if values:
                    if metric == "ppl":  # removing layer 0 costs orders of magnitude more than the rest
                        values, metric = [math.log(v) for v in values], "log ppl"
                    low, high = min(values), max(values)
                    axis.plot([(v - low) / ((high - low) or 1) for v in values], marker=".", label=metric)
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
        path = folder / "study-importance-profiles.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path.name)
    return written


def write_report(args: argparse.Namespace) -> None:
    names = reported_models(args)
    figures = draw_figures(args.results.parent / "figures", names)
    done = sum(len(_cells(name)) for name in names)
    header = [
        "# Reproduction study", "",
        f"Written by `python benchmarks/study.py` on {dt.date.today().isoformat()}; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), Python {platform.python_version()}; versions: "
        + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", "",
        f"Settings: calibration {args.samples} x {args.seq_len} tokens of wiki-sample train; perplexity on the first "
        f"{args.ppl_windows} windows of {args.seq_len} tokens of the held-out wiki-sample test split; zero-shot tasks "
        f"{args.tasks} (first {args.task_limit} examples each, through lm-eval); healing {args.heal_steps} steps "
        f"x {args.heal_rows} rows x {HEAL_SEQ_LEN} tokens of wiki-sample train (the toolkit's default learning "
        f"rates). Cells finished: {done}.", "",
        "Decode speed-ups: the pruned and the unpruned model decode in turns (64-token prompt, 32 new tokens, median "
        "of 3 after a warm-up) on a shared 2-core CPU, so load changes hit both alike. Cells not run yet are "
        "marked —; the study is resumable and fills them on the next run.", "",
    ]
    body = [model_tables(name) for name in names]
    pictures = [f"![{name}](figures/{name})" for name in figures]
    text = "\n".join(header + ["## Tables", ""] + body + ["## Figures", ""] + pictures + [""])
    if CLAIMS.exists() and args.results.resolve().parent == CLAIMS.parent:
        text += "\n" + CLAIMS.read_text()
    elif CLAIMS.exists():  # its links are relative to docs/: a report elsewhere points to it instead
        text += f"\nThe papers' claims beside these measurements: {CLAIMS.relative_to(ROOT)} (also at the end of docs/RESULTS.md).\n"
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
