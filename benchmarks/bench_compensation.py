"""Training-free repair of a cut: held-out perplexity unrepaired and after replace-linear (ReplaceMe),
rescale (Prune&Comp) and merge (LaCo), for the angular (consecutive) cut and BI's cut.

    python benchmarks/bench_compensation.py                       # SmolLM2 and Gemma-3, 12/25/37%
    python benchmarks/bench_compensation.py --models smollm2-135m --shares 25 --max-windows 8

Each cell (model, cut, share, method) starts from a fresh copy of the original, cuts and repairs
it with the same calibration windows (the first ``--samples`` contiguous windows of the train
split), and scores the held-out split. Wall time of the repair (the statistics pass and, for the
cosine solver, its own steps) and the process's peak RSS are reported. Results are saved per cell
under ``$LAYERPRUNE_CACHE/bench-compensation/`` so an interrupted run resumes; the table goes to
docs/benchmarks.md § Compensation.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.outputs import write_json_atomic
from layerprune.repair import REPAIRS, compensate
from layerprune.reporting.eval_tables import update_doc_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
CUTS = {"angular": ("angular", "consecutive"), "bi": ("bi", "independent")}
METHODS = ("none", *REPAIRS)


def cut_layers(loaded: lp.LoadedModel, calibration: Any, cut: str, share: int) -> list[int]:
    metric, strategy = CUTS[cut]
    report = lp.score(loaded, calibration, [metric])
    return lp.select(report, f"{share}%", strategy, metric).remove


def run_cell(original: lp.LoadedModel, calibration: Any, layers: list[int], method: str,
             args: argparse.Namespace) -> dict[str, Any]:
    loaded = original.copy()
    began = time.perf_counter()
    if method == "none":
        lp.prune(loaded, layers)
        details: dict[str, Any] = {}
    else:
        report = compensate(loaded, layers, method, calibration, batch_size=args.batch_size)
        details = {"runs": report.runs, "statistics_seconds": round(report.statistics_seconds, 2)}
    seconds = time.perf_counter() - began
    ppl = dataset_perplexity(loaded.model, loaded.tokenizer, args.eval_data, args.seq_len,
                             max_windows=args.max_windows)
    return {"method": method, "removed": layers, "ppl": ppl.ppl, "tokens": ppl.tokens, "seconds": round(seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **details}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | cut | removed | " + " | ".join(METHODS) + " | repair s (max) |",
             "|---|---|---|" + "---|" * len(METHODS) + "---|"]
    groups: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key, cell in results.items():
        model, cut, share, method = key.split("|")
        groups.setdefault((model, cut, int(share)), {})[method] = cell
    for (model, cut, share), cells in sorted(groups.items()):
        ppl = " | ".join(f"{cells[m]['ppl']:.1f}" if m in cells else "–" for m in METHODS)
        slowest = max((c["seconds"] for m, c in cells.items() if m != "none"), default=0.0)
        lines.append(f"| {model} | {cut} | {share}% | {ppl} | {slowest:.1f} |")
    return "\n".join(lines)


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
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    folder = cache_dir() / "bench-compensation"
    results_file = folder / f"results-{args.samples}x{args.seq_len}-{args.max_windows}.json"
    results: dict[str, dict[str, Any]] = json.loads(results_file.read_text()) if results_file.exists() else {}
    for model in args.models.split(","):
        original = lp.load_model(model)
        calibration = lp.build_calibration(original.tokenizer, args.data, samples=args.samples, seq_len=args.seq_len,
                                           sampling="contiguous")
        for cut in args.cuts.split(","):
            for share in (int(s) for s in args.shares.split(",")):
                layers = cut_layers(original, calibration, cut, share)
                for method in METHODS:
                    key = f"{model}|{cut}|{share}|{method}"
                    if key in results:
                        continue
                    try:
                        results[key] = run_cell(original, calibration, layers, method, args)
                    except lp.UsageError as error:  # e.g. a cut from layer 0 that replace-linear cannot fold
                        print(f"{key}: skipped ({error})")
                        continue
                    write_json_atomic(results_file, results, overwrite=True)
                    print(f"{key}: ppl {results[key]['ppl']:.2f} in {results[key]['seconds']} s")
    print(table(results))
    if not args.no_doc:
        body = (f"Held-out perplexity ({args.eval_data}, {args.seq_len}-token windows) after cutting and repairing "
                f"without training on the first {args.samples} contiguous {args.seq_len}-token windows of "
                f"{args.data}. `none` is plain removal.\n\n{table(results)}")
        update_doc_section(DOC, "## Compensation", "### Perplexity after a training-free repair", body)


if __name__ == "__main__":
    main()
