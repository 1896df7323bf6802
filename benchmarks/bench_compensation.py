"""Training-free repair of a cut: held-out perplexity unrepaired and after replace-linear (ReplaceMe),
rescale (Prune&Comp) and merge (LaCo), for the angular (consecutive) cut and BI's cut, plus
ReplaceMe's cosine solver and Prune&Comp's iterative pruning; then each repair followed by LoRA,
beside LoRA, partial-ft and replace-layer on the plain cut, all trained on as many tokens as the
repairs read.

    python benchmarks/bench_compensation.py                       # SmolLM2 and Gemma-3, 12/25/37%
    python benchmarks/bench_compensation.py --models smollm2-135m --shares 25 --columns none,rescale,lora

Each cell (model, cut, share, column) starts from a fresh copy of the original, cuts and repairs
it with the same calibration windows (the first ``--samples`` contiguous windows of the train
split), heals it where the column says so, and scores the held-out split. The healing budget is
the study's (``--heal-steps`` x ``--heal-rows`` rows of ``--heal-seq-len`` tokens: 20 x 4 x 128 =
10,240 tokens, the same count as the repairs' 40 x 256), so "does a repaired start heal better?"
and "training-free against trained" are both compared at equal data. Wall time (repair plus
healing) and the process's peak RSS are reported. Results are saved per cell under
``$LAYERPRUNE_CACHE/bench-compensation/`` so an interrupted run resumes; the table goes to
docs/benchmarks.md § Compensation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.evaluation.efficiency import status_bytes
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.outputs import write_json_atomic
from layerprune.repair import REPAIRS, compensate
from layerprune.repair.iterative import compensate_iteratively
from layerprune.repair.linear import ReplaceLinearOptions
from layerprune.reporting.eval_tables import update_doc_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
CUTS = {"angular": ("angular", "consecutive"), "bi": ("bi", "independent")}
HEALERS = ("lora", "partial-ft", "replace-layer")
VARIANTS = {"replace-linear-cosine": ("replace-linear", ReplaceLinearOptions(solver="cosine"))}
"""Repairs with other options than their defaults: ReplaceMe's cosine solver, whose Adam steps after
the least-squares start are timed on their own (the cost bar is for the statistics and the fold)."""
ITERATIVE = {"rescale-iterative": "rescale"}
"""Prune&Comp's iterative pruning: remove the cut metric's least important layer, repair, re-score the
repaired model, repeat, for as many layers as the one-shot cut. It chooses its own layers, so it
stands beside an independent cut only (BI's)."""
COLUMNS = ("none", *REPAIRS, *VARIANTS, *ITERATIVE, "lora", *(f"{method}+lora" for method in REPAIRS), "partial-ft",
           "replace-layer")
"""Plain removal, each repair and variant, LoRA after plain removal and after each repair, then the other healers."""


def column_parts(column: str) -> tuple[str | None, str | None]:
    """``(repair, healer)`` of a column: ``none`` is plain removal, ``rescale+lora`` both."""
    repair, _, healer = column.partition("+")
    if repair in HEALERS:
        return None, repair
    return (None if repair == "none" else repair), (healer or None)


def consecutive(layers: list[int]) -> bool:
    return layers == list(range(layers[0], layers[0] + len(layers)))


def cut_layers(loaded: lp.LoadedModel, calibration: Any, cut: str, share: int) -> list[int]:
    metric, strategy = CUTS[cut]
    report = lp.score(loaded, calibration, [metric])
    return lp.select(report, f"{share}%", strategy, metric).remove


def peak_growth(work: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """Run ``work``; return its result, its wall seconds and how far the resident set peaked above
    where it started (MiB: VmHWM after resetting it through ``/proc/self/clear_refs``; ``None``
    where that is not possible). The process's lifetime peak (ru_maxrss) cannot tell one step's
    memory from the models loaded before it. Only the first steps of a process read true: later
    ones reuse memory the allocator kept from earlier cells, and read as growing by ~0."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = status_bytes("VmRSS")
    except OSError:
        before = None
    began = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - began
    return result, seconds, (None if before is None else round((status_bytes("VmHWM") - before) / 2**20, 1))


def plain_forward(original: lp.LoadedModel, calibration: Any, batch_size: int) -> None:
    """One forward pass of the original over the calibration rows, as the repair batches them:
    what a repair's cost is measured against."""
    with torch.no_grad():
        for first in range(0, calibration.input_ids.shape[0], batch_size):
            original.model(input_ids=calibration.input_ids[first:first + batch_size],
                           attention_mask=calibration.attention_mask[first:first + batch_size], use_cache=False)


def run_cell(original: lp.LoadedModel, calibration: Any, layers: list[int], column: str,
             args: argparse.Namespace, metric: str) -> dict[str, Any]:
    repair, healer = column_parts(column)
    loaded = original.copy()
    details: dict[str, Any] = {}
    began = time.perf_counter()
    if repair is None:
        lp.prune(loaded, layers)
    elif repair in ITERATIVE:  # re-scoring is part of the method: timed whole, no ratio to one forward pass
        report = lp.score(loaded, calibration, [metric])
        selection = compensate_iteratively(loaded, report, len(layers), ITERATIVE[repair], calibration,
                                           rescore=lambda name: lp.score(loaded, calibration, [name]).results[name],
                                           metric=metric, batch_size=args.batch_size)
        layers = selection.remove
        details = {"removal_order": [step["removed"] for step in selection.steps],
                   "runs": [run for step in loaded.lineage["repairs"] for run in step["runs"]]}
    else:
        # the plain pass right before the repair, so a load change hits both sides alike
        _, forward_seconds, forward_mib = peak_growth(lambda: plain_forward(original, calibration, args.batch_size))
        began = time.perf_counter()
        method, options = VARIANTS.get(repair, (repair, None))
        report, repair_seconds, repair_mib = peak_growth(
            lambda: compensate(loaded, layers, method, calibration, options=options, batch_size=args.batch_size))
        solver_seconds = sum(run.get("cosine_seconds", 0.0) for run in report.runs)
        details = {"runs": report.runs, "statistics_seconds": round(report.statistics_seconds, 4),
                   "repair_seconds": round(repair_seconds, 4), "forward_seconds": round(forward_seconds, 4),
                   "solver_seconds": round(solver_seconds, 4),
                   "cost_vs_forward": round((repair_seconds - solver_seconds) / forward_seconds, 3),
                   "repair_peak_mib": repair_mib, "forward_peak_mib": forward_mib}
    if healer is not None:
        torch.manual_seed(0)
        loaded = lp.heal(loaded, healer, args.data, original=original, steps=args.heal_steps,
                         batch_size=args.heal_rows, seq_len=args.heal_seq_len)
        details["heal_budget"] = {"steps": args.heal_steps, "rows": args.heal_rows, "seq_len": args.heal_seq_len}
    seconds = time.perf_counter() - began
    ppl = dataset_perplexity(loaded.model, loaded.tokenizer, args.eval_data, args.seq_len,
                             max_windows=args.max_windows)
    return {"method": column, "removed": layers, "ppl": ppl.ppl, "ci95": ppl.as_dict().get("ci95"),
            "tokens": ppl.tokens, "seconds": round(seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load_average": round(os.getloadavg()[0], 2), **details}


def table(results: dict[str, dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = ["| model | cut | removed | " + " | ".join(columns)
             + " | slowest cell s | repair s / forward s (max) | cosine solver's steps s |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|---|"]
    groups: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key, cell in results.items():
        model, cut, share, column = key.split("|")
        groups.setdefault((model, cut, int(share)), {})[column] = cell
    for (model, cut, share), cells in sorted(groups.items()):
        ppl = " | ".join(f"{cells[c]['ppl']:.4g}" if c in cells else "–" for c in columns)
        slowest = max((c["seconds"] for name, c in cells.items() if name != "none"), default=0.0)
        cost = max((c["cost_vs_forward"] for c in cells.values() if "cost_vs_forward" in c), default=None)
        solver = max((c.get("solver_seconds", 0.0) for name, c in cells.items() if name in VARIANTS), default=None)
        lines.append(f"| {model} | {cut} | {share}% | {ppl} | {slowest:.1f} | "
                     + (f"{cost:.2f}" if cost is not None else "–") + " | "
                     + (f"{solver:.1f}" if solver is not None else "–") + " |")
    return "\n".join(lines)


def measure(args: argparse.Namespace, results: dict[str, dict[str, Any]], results_file: Path) -> None:
    """Measure every cell of ``args`` not in ``results`` yet, saving ``results`` after each one."""
    for model in args.models.split(","):
        original = lp.load_model(model)
        calibration = lp.build_calibration(original.tokenizer, args.data, samples=args.samples, seq_len=args.seq_len,
                                           sampling="contiguous")
        for cut in args.cuts.split(","):
            for share in (int(s) for s in args.shares.split(",")):
                layers = cut_layers(original, calibration, cut, share)
                for column in args.columns.split(","):
                    key = f"{model}|{cut}|{share}|{column}"
                    if key in results:
                        continue
                    if column in ITERATIVE and CUTS[cut][1] != "independent":
                        print(f"{key}: skipped (iterative pruning chooses its own layers: it stands beside an "
                              "independent cut)")
                        continue
                    if column == "replace-layer" and not consecutive(layers):
                        print(f"{key}: skipped (replace-layer stands in for one consecutive run; this cut has several)")
                        continue
                    try:
                        results[key] = run_cell(original, calibration, layers, column, args, metric=CUTS[cut][0])
                    except lp.UsageError as error:  # e.g. a cut from layer 0 that replace-linear cannot fold
                        print(f"{key}: skipped ({error})")
                        continue
                    write_json_atomic(results_file, results, overwrite=True)
                    print(f"{key}: ppl {results[key]['ppl']:.2f} in {results[key]['seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--shares", default="12,25,37", help="percent of layers removed")
    parser.add_argument("--cuts", default="angular,bi")
    parser.add_argument("--data", default="wiki-sample", help="calibration text (train split)")
    parser.add_argument("--eval-data", default="wiki-sample", help="held-out perplexity data (test split)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first N test windows")
    parser.add_argument("--columns", default=",".join(COLUMNS), help="which cells of each cut to measure")
    parser.add_argument("--heal-steps", type=int, default=20, help="the study's healing budget: optimizer steps")
    parser.add_argument("--heal-rows", type=int, default=4, help="rows per healing step")
    parser.add_argument("--heal-seq-len", type=int, default=128, help="tokens per healing row")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite the table from the cells already saved")
    args = parser.parse_args()

    folder = cache_dir() / "bench-compensation"
    results_file = folder / f"results-{args.samples}x{args.seq_len}-{args.max_windows}.json"
    results: dict[str, dict[str, Any]] = json.loads(results_file.read_text()) if results_file.exists() else {}
    if not args.report_only:
        measure(args, results, results_file)
    shown = tuple(c for c in COLUMNS if any(key.endswith(f"|{c}") for key in results))
    print(table(results, shown))
    if not args.no_doc:
        loads = [cell["load_average"] for cell in results.values() if "load_average" in cell]
        load = f"{min(loads)}-{max(loads)}" if loads else "not recorded"
        windows = f"the first {args.max_windows}" if args.max_windows else "all"
        body = (f"Held-out perplexity ({args.eval_data} test split, {windows} {args.seq_len}-token windows) after "
                f"cutting and repairing without training on the first {args.samples} contiguous {args.seq_len}-token "
                f"windows of {args.data}. `none` is plain removal; `replace-linear-cosine` is replace-linear with "
                "ReplaceMe's cosine solver (Adam steps from the least-squares start, timed on their own in the last "
                "column and left out of the cost ratio, which compares each repair's statistics pass and fold with one "
                "plain forward pass of the original over the same rows); `rescale-iterative` is Prune&Comp's iterative "
                "pruning (remove BI's least important layer, rescale, re-score the rescaled model, repeat; its own "
                "layers, as many as the cut's, so BI's row only); `X+lora` is repair X then LoRA; `lora`, "
                "`partial-ft` and "
                f"`replace-layer` heal the plain cut, each for {args.heal_steps} steps of {args.heal_rows} x "
                f"{args.heal_seq_len} tokens of {args.data} ({args.heal_steps * args.heal_rows * args.heal_seq_len:,} "
                f"tokens, as many as the repairs read: {args.samples * args.seq_len:,}). `replace-layer` applies to "
                f"one consecutive run only. Written {dt.date.today()}, CPU, "
                f"{os.cpu_count()} cores shared with other jobs (1-minute load average at the cells' ends: {load}), "
                f"torch {torch.__version__}, transformers {transformers.__version__}.\n\n{table(results, shown)}")
        update_doc_section(DOC, "## Compensation", "### Perplexity after a training-free repair", body)


if __name__ == "__main__":
    main()
