"""The study's 25% column re-read with fidelity (issue #33, "Measure"): KL, top-1 agreement,
generation agreement and retained performance above chance for every 25% cell of both models.

    python benchmarks/fidelity_reread.py                    # every cell not re-read yet (resumable)
    python benchmarks/fidelity_reread.py --models smollm2-135m --metrics bi --heals none   # one cell
    python benchmarks/fidelity_reread.py --claims-only      # only the cells the claims' comparisons read
    python benchmarks/fidelity_reread.py --report-only      # only rewrite docs/benchmarks.md § Fidelity

A cell is the suite study's (docs/suite/RESULTS.md: ``benchmarks/study.py --tasks lp_offline`` at
25%): a model, a metric's cut and a healing or repair. The cut is the study's selection, read from
the study's cache (``$LAYERPRUNE_CACHE/study/<settings>/<model>/``) where this machine has it and
else scored and selected again there exactly as the study does (its calibration, seed and
strategy; the scores are then cached for the study too). The study keeps no healed model: every
healed or repaired cell is rebuilt with the study's recipe (seed 0, 20 steps x 4 rows x 128 tokens
of wiki-sample train; minutes per cell on a CPU). Each cell's held-out perplexity is measured again
and printed beside the study's (``docs/suite/RESULTS-cells.csv``), so a cut or healing that did not
come out as the study's is seen, and marked.

Measured per cell, against the unpruned original:

* fidelity: KL(original || cell) in nats per predicted token and top-1 agreement on the study's
  perplexity windows (16 x 256 tokens of the wiki-sample test split), 95% bootstrap intervals over
  windows (``eval --fidelity``'s numbers; the per-window sums are kept for paired comparisons);
* generation agreement: greedy continuations of 16 wiki-sample test prompts (32 tokens, in the chat
  template) by the original and the cell: mean tokens before the first divergence, share identical
  (``eval --generation``'s);
* the offline suite (``lp_offline``, 100 examples per task) with the study's measurement: RP and RP
  above chance (``retained_above_chance``), each with its paired-bootstrap interval.

Cost on the 2-core x86 CPU with nothing else running (2026-12-07; load 2-3, the upper ends with a
test run beside it): once per model 169 s on SmolLM2 and 516 s on Gemma-3 (the original's suite and
perplexity, scoring, its continuations; read back from the cache on later runs); a SmolLM2 cell
59-78 s unhealed, 62-101 s repaired, 73-136 s healed or replaced; a Gemma-3 cell 129-149 s
unhealed, 123-174 s repaired, 165-249 s healed or replaced (its 262k-token head in every pass, the
KL over 262k words). The suite study's column has 116 cells at 25%, 96 distinct (twins are copied).
``--claims-only`` (the 24 cells the claims' comparisons read, 14 of SmolLM2 and 10 of Gemma-3) took
53 min; SmolLM2's whole column (51 cells measured, 7 twins copied) 76 min of cell time, Gemma-3's
(45 measured, 13 copied) 131 min, of which its last 35 cells ran in 102 min (20:54-22:36) in one
run; the whole column about 3.5 h: run it in parts. On a loaded machine (load 3-4) a SmolLM2 cell
took 703 s.

Each cell is kept as JSON in ``benchmarks/results/study-fidelity/`` (``--results``), committed: the
re-read takes hours, so a killed run, a later session or another machine continues where the last
one stopped (a cell whose layers another metric chose too is measured once). A cell holds numbers
only, with its wall-clock seconds per phase and the 1-minute load average when it started; the
original's continuations (the source text's words) stay in the user cache dir and are generated
again where they are missing (greedy: the same tokens). Beside the cells: the original's
measurement they are read against, the scores and the selections. After every cell the § Fidelity
table of docs/benchmarks.md is rewritten from all kept cells, with the comparisons the claims'
verdicts rest on read with each measure (:data:`COMPARISONS`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.data.prompts import draw_prompts
from layerprune.evaluation.fidelity import FidelityResult, window_fidelity
from layerprune.evaluation.generation import agreed_tokens, generation_agreement
from layerprune.evaluation.intervals import (
    ratio_interval,
    retained_above_chance,
    retained_difference,
)
from layerprune.evaluation.perplexity import (
    dataset_stream,
    first_target,
    window_batches,
)
from layerprune.models.generation import greedy_continuations
from layerprune.models.lineage import versions
from layerprune.options import comma_choices
from layerprune.outputs import write_json_atomic
from layerprune.reporting.eval_tables import update_doc_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
STUDY_CSV = ROOT / "docs" / "suite" / "RESULTS-cells.csv"
RESULTS = ROOT / "benchmarks" / "results" / "study-fidelity"
RATIO = "25%"
DATA = "wiki-sample"
PROMPT_SEED = 0
PROMPT_TOKENS = 32
PPL_MISMATCH = 0.005
"""A re-measured perplexity further than this (relative) from the study's marks the cell: its cut or
healing did not come out as the study's (the CSV keeps 4 significant digits)."""

COMPARISONS: tuple[tuple[str, str, tuple[str, str], tuple[str, str]], ...] = (
    ("ShortGPT: BI against `ppl`", "smollm2-135m", ("bi", "none"), ("ppl", "none")),
    ("ShortGPT, Gromov: BI against the angular block", "smollm2-135m", ("bi", "none"), ("angular", "none")),
    ("ShortGPT, Gromov: BI against the angular block", "gemma3-270m", ("bi", "none"), ("angular", "none")),
    ("ShortGPT, Lu (a): BI against the last layers", "smollm2-135m", ("bi", "none"), ("reverse-order", "none")),
    ("ShortGPT, Lu (a): BI against the last layers", "gemma3-270m", ("bi", "none"), ("reverse-order", "none")),
    ("LLM-Streamline: trained replacement of the angular block", "smollm2-135m",
     ("angular", "replace-layer"), ("angular", "none")),
    ("LLM-Streamline: trained replacement of the angular block", "gemma3-270m",
     ("angular", "replace-layer"), ("angular", "none")),
    ("Lu (b): partial-ft against LoRA on BI's cut", "smollm2-135m", ("bi", "partial-ft"), ("bi", "lora")),
    ("Lu (b): partial-ft against LoRA on BI's cut", "gemma3-270m", ("bi", "partial-ft"), ("bi", "lora")),
    ("Lu (b): partial-ft against LoRA on iterative BI's cut", "smollm2-135m",
     ("bi-iterative", "partial-ft"), ("bi-iterative", "lora")),
    ("SLEB: iterative against one-shot BI", "smollm2-135m", ("bi-iterative", "none"), ("bi", "none")),
    ("ReplaceMe: linear map against trained replacement", "smollm2-135m",
     ("angular", "replace-linear"), ("angular", "replace-layer")),
    ("ReplaceMe: linear map against trained replacement", "gemma3-270m",
     ("angular", "replace-linear"), ("angular", "replace-layer")),
    ("ReplaceMe: linear map on the angular block", "gemma3-270m", ("angular", "replace-linear"), ("angular", "none")),
    ("Prune&Comp: rescale on the angular block", "smollm2-135m", ("angular", "rescale"), ("angular", "none")),
    ("Prune&Comp: rescale on the angular block", "gemma3-270m", ("angular", "rescale"), ("angular", "none")),
    ("Prune&Comp: rescale on BI's cut", "smollm2-135m", ("bi", "rescale"), ("bi", "none")),
    ("Prune&Comp: rescale on BI's cut", "gemma3-270m", ("bi", "rescale"), ("bi", "none")),
    ("LaCo: merge on BI's cut", "smollm2-135m", ("bi", "merge"), ("bi", "none")),
    ("LaCo: merge on BI's cut", "gemma3-270m", ("bi", "merge"), ("bi", "none")),
)
"""The pairs of 25% cells the claims' verdicts (docs/claims.md) rest on: (claim, model, A, B), each
cell a (metric, healing). Each is read as A minus B with every measure's paired interval."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(study.MODELS))
    parser.add_argument("--metrics", type=comma_choices(study.METRICS), default=list(study.METRICS))
    parser.add_argument("--heals", type=comma_choices(study.HEALS), default=list(study.HEALS))
    parser.add_argument("--prompts", type=int, default=16, help="generation prompts per cell")
    parser.add_argument("--generation-tokens", type=int, default=32, help="tokens each continuation has at most")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the doc section from the kept cells")
    parser.add_argument("--claims-only", action="store_true",
                        help="only the cells COMPARISONS reads (the claims' verdicts), among --models/--metrics/--heals")
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown file whose § Fidelity is rewritten")
    parser.add_argument("--study-csv", type=Path, default=STUDY_CSV, help="the study's cells, for its perplexities")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the cells are kept (default: benchmarks/results/study-fidelity, committed)")
    # the suite study's settings (benchmarks/study.py --tasks lp_offline): its cache folder is named by them
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--task-limit", type=int, default=100)
    parser.add_argument("--tasks", default="lp_offline")
    parser.add_argument("--heal-steps", type=int, default=20)
    parser.add_argument("--heal-rows", type=int, default=4)
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.generation_tokens < 1:
        parser.error("--prompts and --generation-tokens must be at least 1")
    return args


def study_args(args: argparse.Namespace) -> argparse.Namespace:
    """The study's own arguments for the same cells (its ``ModelRun`` and ``measure`` read them)."""
    argv = ["--models", args.models, "--metrics", ",".join(args.metrics), "--ratios", RATIO,
            "--heals", ",".join(args.heals),
            "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--ppl-windows", str(args.ppl_windows),
            "--task-limit", str(args.task_limit), "--tasks", args.tasks, "--heal-steps", str(args.heal_steps),
            "--heal-rows", str(args.heal_rows)]
    parsed = study.parse_args(argv)
    study.ARGS.__dict__.update(vars(parsed))
    return parsed


def settings_folder(name: str, args: argparse.Namespace) -> Path:
    """A folder named by the study's settings and generation's, then the model: other settings never mix."""
    settings = study.study_dir(name).parent.name
    return Path(f"{settings}-prompts{args.prompts}-gen{args.generation_tokens}") / study.file_stem(name)


def reread_dir(name: str, args: argparse.Namespace) -> Path:
    """The kept cells of ``name`` (see the module docstring), and what they are read against."""
    return args.results / settings_folder(name, args)


def cell_file(name: str, metric: str, heal: str, args: argparse.Namespace) -> Path:
    return reread_dir(name, args) / f"{metric}_{RATIO.rstrip('%')}_{heal}.json"


def cached_cells(name: str, args: argparse.Namespace) -> dict[tuple[str, str], dict[str, Any]]:
    folder = reread_dir(name, args)
    cells = {}
    for path in sorted(folder.glob("*_*_*.json")):
        cell = json.loads(path.read_text())
        cells[cell["metric"], cell["heal"]] = cell
    return cells


class Run(study.ModelRun):
    """One model's shared work, as the study's (its original, unpruned measurement, scores and
    selections) but kept in the re-read's folder: the study's own cache is only read, never written,
    so a study report rendered later is not changed by a re-read (a study folder holding only an
    unpruned row would replace the committed cells of that model in its report)."""

    def __init__(self, name: str, args: argparse.Namespace, folder: Path) -> None:
        self.name, self.folder, self.args = name, folder, args
        self.original = lp.load_model(name)
        studied, base_file = study.study_dir(name) / "unpruned.json", folder / "unpruned.json"
        if studied.is_file():  # the study's own measurement of the original, where this machine has it
            base_file = studied
        elif not base_file.is_file():
            write_json_atomic(base_file, study.measure(self.original, args, None))
        self.base = json.loads(base_file.read_text())

    def removed_layers(self, metric: str, ratio: str) -> list[int]:
        """The study's cut: its unhealed cell's layers where this machine has the cell, else the
        study's scoring and selection, done again here and kept in ``selections.json``."""
        studied = study.study_dir(self.name) / f"{metric}_{ratio.rstrip('%')}_none.json"
        if studied.is_file():
            return json.loads(studied.read_text())["removed"]
        return self.selections[f"{metric} {ratio}"]


@torch.no_grad()
def window_sums(original: lp.LoadedModel, model: lp.LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    """Fidelity on the study's perplexity windows, with the per-window sums a paired comparison of two
    cells resamples: ``eval --fidelity``'s numbers (``evaluation.fidelity``) and its windows."""
    stream, prefix = dataset_stream(original.tokenizer, DATA)
    first = first_target(prefix)
    kl: list[float] = []
    agreed: list[int] = []
    tokens: list[int] = []
    device = next(model.model.parameters()).device
    for batch in window_batches(stream, args.seq_len, batch_size=4, max_windows=args.ppl_windows, prefix=prefix):
        batch = batch.to(device)
        ours = original.model(input_ids=batch, use_cache=False).logits[:, first - 1:-1].float().cpu()
        theirs = model.model(input_ids=batch, use_cache=False).logits[:, first - 1:-1].float().cpu()
        window_kl, window_agreed = window_fidelity(ours, theirs)
        kl += window_kl
        agreed += window_agreed
        tokens += [ours.shape[1]] * ours.shape[0]
    return {**FidelityResult.of_windows(kl, agreed, tokens).as_dict(), "window_kl": kl, "window_agreed": agreed,
            "window_tokens": tokens}


def original_generation(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """The original's greedy continuations of the prompts, generated once per model and cached."""
    path = cache_dir() / "study-fidelity" / settings_folder(run.name, args) / "original-generation.json"
    if path.is_file():
        return json.loads(path.read_text())
    tokenizer = run.original.tokenizer
    prompts = draw_prompts(tokenizer, DATA, count=args.prompts, prompt_tokens=PROMPT_TOKENS, split="test",
                           seed=PROMPT_SEED)
    said = greedy_continuations(run.original.model, prompts, args.generation_tokens, tokenizer.eos_token_id)
    result = {"prompts": prompts, "continuations": said}
    write_json_atomic(path, result)
    return result


def generation(run: Run, model: lp.LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    """``eval --generation``'s agreement of ``model`` with the original, and each prompt's agreed tokens."""
    reference = original_generation(run, args)
    prompts, said = reference["prompts"], reference["continuations"]
    theirs = greedy_continuations(model.model, prompts, args.generation_tokens, run.original.tokenizer.eos_token_id)
    return {**generation_agreement(said, theirs), "agreed": [agreed_tokens(a, b) for a, b in zip(said, theirs)]}


def study_ppl(args: argparse.Namespace) -> dict[tuple[str, str, str], float]:
    """The study's perplexity of each (model, metric, healing) at 25%, from its committed CSV."""
    if not args.study_csv.is_file():
        return {}
    _, rows = study.read_cells_csv(args.study_csv)
    return {(name, metric, heal): row["ppl"] for name, model_rows in rows.items()
            for (metric, ratio, heal), row in model_rows.items() if ratio == RATIO and row.get("ppl") is not None}


def run_cell(run: Run, metric: str, heal: str, args: argparse.Namespace,
             study_args_: argparse.Namespace) -> dict[str, Any] | None:
    """Build the study's cell (cut, then its healing or repair) and measure it; cached. None where the
    healing does not apply to the cut (as in the study)."""
    if heal == "replace-layer" and not study.replacement_applies(metric):
        return None
    path = cell_file(run.name, metric, heal, args)
    if path.is_file():
        return json.loads(path.read_text())
    remove = run.removed_layers(metric, RATIO)
    if heal == "replace-layer" and not study.replacement_applies(metric, remove):
        return None
    if not study.repair_applies(heal, remove):
        return None
    twin = next((c for c in cached_cells(run.name, args).values() if c["heal"] == heal and c["selected"] == remove),
                None)
    if twin is not None:  # another metric chose the very same layers: the same model, measured once
        cell = {**twin, "metric": metric, "same_as": twin.get("same_as") or twin["metric"]}
        write_json_atomic(path, cell)
        return cell
    load = os.getloadavg()[0]
    began = time.perf_counter()
    pruned = run.original.copy()
    lp.prune(pruned, remove, reason=f"{metric} {study.METRICS[metric][1]} {RATIO}")
    if heal != "none":
        pruned = study.heal_cell(pruned, heal, run.original, args)
    seconds = {"build": time.perf_counter() - began}
    mark = time.perf_counter()
    measured = study.measure(pruned, study_args_, run.base)
    seconds["suite_and_ppl"] = time.perf_counter() - mark
    mark = time.perf_counter()
    fidelity = window_sums(run.original, pruned, args)
    seconds["fidelity"] = time.perf_counter() - mark
    mark = time.perf_counter()
    generated = generation(run, pruned, args)
    seconds["generation"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - began
    chance = {task: rate for task, rate in measured.get("chance", {}).items() if rate is not None}
    cell = {"metric": metric, "ratio": RATIO, "heal": heal, "selected": remove, "layers": pruned.num_layers,
            "ppl": measured["ppl"], "study_ppl": study_ppl(args).get((run.name, metric, heal)),
            "accuracy": measured["accuracy"], "chance": chance, "correct": measured["correct"],
            "retained": measured.get("retained"),
            "retained_above_chance": retained_above_chance(run.base["correct"], measured["correct"], chance),
            "fidelity": fidelity, "generation": generated,
            "seconds": {phase: round(value, 1) for phase, value in seconds.items()}, "load_average": round(load, 2),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "versions": ", ".join(f"{k} {v}" for k, v in versions().items())}
    write_json_atomic(path, cell)
    print(f"{run.name} {metric} {RATIO} {heal}: KL {fidelity['kl']:.3f}, top-1 {fidelity['top1_agreement']:.3f}, "
          f"agreed tokens {generated['mean_agreed_tokens']:.1f}, ppl {cell['ppl']:.4g} "
          f"(study {cell['study_ppl']}), {cell['seconds']['total']} s at load {load:.2f}", flush=True)
    return cell


# --- reading the cells --------------------------------------------------------------------------------


def _interval(mean: float | None, ci: Sequence[float] | None, pattern: str) -> str:
    if mean is None:
        return "—"
    return pattern.format(mean) + (f" [{pattern.format(ci[0])}, {pattern.format(ci[1])}]" if ci else "")


def reading(mean: float | None, ci95: Sequence[float] | None, higher_is_better: bool = True) -> str:
    """What a paired difference A − B says: "A" (A better), "B", "level" (the interval holds 0) or "—"."""
    if mean is None or ci95 is None:
        return "—"
    if ci95[0] > 0 or ci95[1] < 0:
        return "A" if (ci95[0] > 0) == higher_is_better else "B"
    return "level"


def paired_window_difference(a: Sequence[float], b: Sequence[float], weights: Sequence[int]) -> dict[str, Any]:
    """Mean of A − B per unit of ``weights`` (tokens, or 1 per prompt), with a paired bootstrap
    interval resampling the same windows (prompts) for both."""
    differences = [x - y for x, y in zip(a, b)]
    return {"mean": sum(differences) / sum(weights), "ci95": ratio_interval(differences, weights)}


def compare(base: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every measure's paired difference A − B of two cells of one model: RP and RP above chance
    (examples resampled), KL and top-1 agreement (windows), agreed generation tokens (prompts)."""
    chance = {**b.get("chance", {}), **a.get("chance", {})}
    fa, fb = a["fidelity"], b["fidelity"]
    prompts = [1] * len(a["generation"]["agreed"])
    return {
        "rp": retained_difference(base["correct"], a["correct"], b["correct"]),
        "above_chance": retained_difference(base["correct"], a["correct"], b["correct"], chance=chance),
        "kl": paired_window_difference(fa["window_kl"], fb["window_kl"], fa["window_tokens"]),
        "top1": paired_window_difference(fa["window_agreed"], fb["window_agreed"], fa["window_tokens"]),
        "generation": paired_window_difference(a["generation"]["agreed"], b["generation"]["agreed"], prompts),
    }


NEW_MEASURES = (("above_chance", "RP above chance", True), ("kl", "KL", False), ("top1", "top-1 agreement", True),
                ("generation", "generation agreement", True))


def verdict_change(differences: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Against RP's reading of a pair: the new measures that read it the other way round
    (``opposite``), and those that separate a pair RP calls level (``sharper``)."""
    rp = reading(**differences["rp"])
    opposite, sharper = [], []
    for key, label, higher in NEW_MEASURES:
        said = reading(**differences[key], higher_is_better=higher)
        if rp in ("A", "B") and said in ("A", "B") and said != rp:
            opposite.append(label)
        elif rp == "level" and said in ("A", "B"):
            sharper.append(f"{label} ({said} better)")
    return opposite, sharper


def cell_name(metric: str, heal: str) -> str:
    return metric if heal == "none" else f"{metric} + {heal}"


def model_table(name: str, cells: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [f"#### {name}", "",
             "| cut | healing | ppl (study's) | RP [95%] | RP above chance [95%] | KL [95%] | top-1 agreement [95%] "
             "| agreed tokens | identical | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for metric in study.METRICS:
        for heal in study.HEALS:
            cell = cells.get((metric, heal))
            if cell is None:
                continue
            f, g = cell["fidelity"], cell["generation"]
            rac, rp = cell["retained_above_chance"], cell.get("retained") or {}
            known = cell.get("study_ppl")
            flag = " ≠" if known and abs(cell["ppl"] / known - 1) > PPL_MISMATCH else ""
            seconds = "=" + cell["same_as"] if cell.get("same_as") else f"{cell['seconds']['total']:.0f}"
            lines.append(f"| {metric} | {heal} | {cell['ppl']:.4g} ({'—' if known is None else f'{known:.4g}'}){flag} "
                         f"| {_interval(rp.get('mean'), rp.get('ci95'), '{:.2f}')} "
                         f"| {_interval(rac['mean'], rac['ci95'], '{:.2f}')} "
                         f"| {_interval(f['kl'], f['kl_ci95'], '{:.3f}')} "
                         f"| {_interval(f['top1_agreement'], f['top1_agreement_ci95'], '{:.3f}')} "
                         f"| {g['mean_agreed_tokens']:.1f} | {g['identical']:.2f} | {seconds} |")
    return lines + [""]


def comparison_rows(bases: dict[str, dict[str, Any]], cells: dict[str, dict[tuple[str, str], dict[str, Any]]]
                    ) -> list[tuple[str, str, str, str, dict[str, dict[str, Any]] | None]]:
    """Each of :data:`COMPARISONS` with its differences (None while either cell is not measured)."""
    rows = []
    for claim, name, a, b in COMPARISONS:
        ca, cb = cells.get(name, {}).get(a), cells.get(name, {}).get(b)
        measured = compare(bases[name], ca, cb) if ca and cb and name in bases else None
        rows.append((claim, name, cell_name(*a), cell_name(*b), measured))
    return rows


def render(args: argparse.Namespace, bases: dict[str, dict[str, Any]],
           cells: dict[str, dict[tuple[str, str], dict[str, Any]]], expected: int) -> str:
    """The § Fidelity subsection: provenance, settings, a table per model, the claims' comparisons
    and what the new measures change."""
    measured = [cell for model_cells in cells.values() for cell in model_cells.values() if not cell.get("same_as")]
    if not measured:
        return ("Not measured yet: run `python benchmarks/fidelity_reread.py` (resumable) to re-read the study's "
                "25% column with KL, top-1 agreement, generation agreement and RP above chance.")
    dates = sorted(cell["date"] for cell in measured)
    loads = sorted(cell["load_average"] for cell in measured)
    done = sum(len(model_cells) for model_cells in cells.values())
    uninformative = sorted({task for cell in measured for task in cell["retained_above_chance"]["uninformative"]})
    lines = [
        f"Measured with `python benchmarks/fidelity_reread.py` on {measured[-1]['machine']} shared with other jobs; "
        f"{measured[-1]['versions']}; {dates[0]} to {dates[-1]} UTC; 1-minute load average when a cell started "
        f"{loads[0]:.2f} to {loads[-1]:.2f}. Cells re-read: {done} of {expected}"
        + (" (the rest: run the command again; it continues where it stopped)." if done < expected else "."), "",
        "Each cell is the suite study's at 25% ([suite/RESULTS.md](suite/RESULTS.md)): the study's cut (its cached "
        "cell's layers where the machine has the study's cache, else its scoring and selection done again), and "
        f"the study keeps no healed model, so every healed or repaired cell is rebuilt with its recipe (seed 0, "
        f"{args.heal_steps} steps x {args.heal_rows} rows x {study.HEAL_SEQ_LEN} tokens of wiki-sample train); "
        "\"ppl (study's)\" is the perplexity measured again and the study's, ≠ where they differ by more than "
        f"{PPL_MISMATCH:.1%} (the cut or healing did not come out as the study's). KL(original || cell) in nats per "
        f"token and top-1 agreement on the study's perplexity windows ({args.ppl_windows} x {args.seq_len} tokens of "
        f"the wiki-sample test split), 95% bootstrap intervals over windows; generation: greedy continuations of "
        f"{args.prompts} wiki-sample test prompts ({PROMPT_TOKENS} tokens, in the chat template where the tokenizer "
        f"has one) up to "
        f"{args.generation_tokens} tokens, mean tokens before the first divergence from the original's and share "
        f"identical; RP and RP above chance on {args.tasks} ({args.task_limit} examples per task), paired-bootstrap "
        "95% intervals; RP above chance leaves out the tasks whose unpruned reference is within its own interval "
        f"of chance ({', '.join(uninformative) or 'none'}). Seconds: the cell's wall clock (build, suite, fidelity, "
        "generation); =m: the same layers as metric m, measured once.", ""]
    for name, model_cells in cells.items():
        if model_cells:
            lines += model_table(name, model_cells)
    rows = comparison_rows(bases, cells)
    lines += ["#### The claims' comparisons, read with each measure", "",
              "A − B with its paired 95% interval (RP and RP above chance: the same examples resampled; KL and top-1: "
              "the same windows; agreed tokens: the same prompts). KL lower is closer to the original; the rest "
              "higher. \"changes\": a new measure that reads the pair the other way round from RP; \"sharper\": one "
              "that separates a pair RP calls level.", "",
              "| claim | model | A | B | RP | RP above chance | KL | top-1 | agreed tokens | against RP |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    changes, sharpened = [], []
    for claim, name, a, b, measured_pair in rows:
        if measured_pair is None:
            lines.append(f"| {claim} | {name} | {a} | {b} | — | — | — | — | — | not measured yet |")
            continue
        opposite, sharper = verdict_change(measured_pair)
        if opposite:
            changes.append(f"{claim} on {name} ({a} against {b}): {', '.join(opposite)} read it the other way")
        if sharper:
            sharpened.append(f"{claim} on {name} ({a} against {b}): {', '.join(sharper)}")
        against = "; ".join(filter(None, [f"changes: {', '.join(opposite)}" if opposite else "",
                                          f"sharper: {', '.join(sharper)}" if sharper else ""])) or "agrees"
        d = measured_pair
        lines.append(f"| {claim} | {name} | {a} | {b} | {_interval(d['rp']['mean'], d['rp']['ci95'], '{:+.2f}')} "
                     f"| {_interval(d['above_chance']['mean'], d['above_chance']['ci95'], '{:+.2f}')} "
                     f"| {_interval(d['kl']['mean'], d['kl']['ci95'], '{:+.3f}')} "
                     f"| {_interval(d['top1']['mean'], d['top1']['ci95'], '{:+.3f}')} "
                     f"| {_interval(d['generation']['mean'], d['generation']['ci95'], '{:+.1f}')} | {against} |")
    pending = sum(1 for row in rows if row[4] is None)
    lines += ["", "**Where the new measures change a verdict.** " + claims_paragraph(changes, sharpened, pending, len(rows))]
    return "\n".join(lines)


def claims_paragraph(changes: list[str], sharpened: list[str], pending: int, total: int) -> str:
    """The verdicts of docs/claims.md rest on RP differences; this says which of them the new measures
    read otherwise, from the measured comparisons only."""
    measured = total - pending
    if not measured:
        return (f"None of the {total} comparisons has both its cells measured yet; this paragraph is rewritten from "
                "them when the re-read runs.")
    text = [f"{measured} of the {total} comparisons measured" + (f" ({pending} wait for their cells)." if pending else ".")]
    if changes:
        text.append("A new measure reads the pair the other way round from RP in: " + "; ".join(changes) + ".")
    else:
        text.append("No new measure reads a measured pair the other way round from RP: where RP separates two cuts, "
                    "KL, top-1 agreement, generation agreement and RP above chance do not contradict it.")
    if sharpened:
        text.append("Pairs RP calls level that a new measure separates (a \"level\" verdict that becomes a ranking): "
                    + "; ".join(sharpened) + ".")
    return " ".join(text)


def reported_models(args: argparse.Namespace) -> list[str]:
    """The two study models always (a run over one keeps the other's table), then any other model run."""
    return list(dict.fromkeys([*study.MODELS, *(m for m in args.models.split(",") if m)]))


def expected_cells(args: argparse.Namespace, cells: dict[str, dict[tuple[str, str], dict[str, Any]]]) -> int:
    """The whole re-read's cells: every (metric, healing) the study's 25% column measured for each model,
    as its CSV lists them (the healings that do not apply are "n/a" there); a model the CSV does not
    have counts the cells re-read."""
    _, rows = study.read_cells_csv(args.study_csv) if args.study_csv.is_file() else ({}, {})
    return sum(sum(1 for (_, ratio, _), row in rows[name].items() if ratio == RATIO and row["status"] == "measured")
               if name in rows else len(cells.get(name, {})) for name in reported_models(args))


def write_doc(args: argparse.Namespace) -> None:
    bases, cells = {}, {}
    for name in reported_models(args):
        for base_file in (study.study_dir(name) / "unpruned.json", reread_dir(name, args) / "unpruned.json"):
            if base_file.is_file():  # the base the cells were measured against (Run's choice)
                bases[name] = json.loads(base_file.read_text())
                break
        cells[name] = cached_cells(name, args)
    update_doc_section(args.doc, "## Fidelity", "### The study's 25% column, re-read",
                       render(args, bases, cells, expected_cells(args, cells)))


def chosen_cells(name: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (metric, healing) cells of ``name`` to re-read, in the study's order: every one of
    ``--metrics`` x ``--heals``, or with ``--claims-only`` those of them a comparison reads."""
    cells = [(metric, heal) for metric in args.metrics for heal in args.heals]
    if not args.claims_only:
        return cells
    compared = {cell for _, model, first, second in COMPARISONS if model == name for cell in (first, second)}
    return [cell for cell in cells if cell in compared]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = study_args(args)
    if not args.report_only:
        for name in args.models.split(","):
            began = time.perf_counter()
            cells = chosen_cells(name, args)
            if not cells:
                continue
            run = Run(name, settings, reread_dir(name, args))
            for metric in dict.fromkeys(metric for metric, _ in cells):
                run.removed_layers(metric, RATIO)  # the study's cut: its cell's, else scored and selected once
            original_generation(run, args)
            print(f"{name}: original measured, cuts selected and its generations made in "
                  f"{time.perf_counter() - began:.0f} s (once per model)", flush=True)
            for metric, heal in cells:
                new = not cell_file(name, metric, heal, args).is_file()
                if run_cell(run, metric, heal, args, settings) is not None and new:
                    write_doc(args)
    write_doc(args)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
