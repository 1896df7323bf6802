"""Search benchmark: ``layerprune search --remove 25% --algorithm heuristic`` against
``layerprune prune --metric ppl --remove 25%`` on the same (default) data, for SmolLM2-135M (25% = 8 of 30 layers) and Gemma-3-270M (5 of 18).

    python benchmarks/bench_search.py                          # both models; docs/benchmarks.md § Search
    python benchmarks/bench_search.py --models smollm2-135m    # one model (results are kept per model)

Two claims of issue 18 are measured:

- **time**: the search takes at most 3x the single ppl cut, both timed as the command a user types
  (a child process, wall-clock, model loading and saving included), one after the other in the
  same run, with the 1-minute load average before each;
- **quality**: its winner is at least as good on held-out text as every single-metric cut. Held-out
  here is the ``wiki-sample`` *test* split, which neither the calibration (train) nor the search's
  ranking (validation) reads, so the winner is not judged on the text that chose it. The single
  metric cuts are every plain (unrepaired) candidate the search ranked, i.e. each metric's
  independent, consecutive and (cheap metrics) iterative selection on the search's own
  calibration rows, plus the model ``prune --metric ppl`` wrote.

Each model's result is saved under ``$LAYERPRUNE_CACHE/bench-search/`` once measured, so the models
can be run in separate parts; the section is rewritten from all saved results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.outputs import write_json_atomic
from layerprune.reporting.eval_tables import update_doc_section

MODELS = ("smollm2-135m", "gemma3-270m")
REMOVE = "25%"
EVAL_WINDOW = 256
EVAL_WINDOWS = 32
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def timed_cli(*args: str) -> dict[str, float]:
    """Wall-clock seconds of one ``layerprune`` command in a child process, and the load before it."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "layerprune.cli.main", *args], check=True)
    return {"seconds": round(time.perf_counter() - start, 1), "load_before": round(load, 2)}


def test_ppl(loaded: lp.LoadedModel) -> float:
    return dataset_perplexity(loaded.model, loaded.tokenizer, "wiki-sample", EVAL_WINDOW,
                              max_windows=EVAL_WINDOWS).ppl


def plain_cuts(record: dict[str, Any]) -> dict[str, list[int]]:
    """Every plain candidate of a search, by the ``metric/strategy`` pairs that chose it."""
    cuts = {}
    for candidate in record["candidates"]:
        if candidate["repair"] is None:
            pairs = [f"{candidate['metric']}/{candidate['strategy']}", *candidate["also_found_by"]]
            cuts[", ".join(pairs)] = candidate["removed_layers"]
    return cuts


def bench(model: str, scratch: Path) -> dict[str, Any]:
    prune = timed_cli("prune", "--model", model, "--metric", "ppl", "--remove", REMOVE, "--out", str(scratch / "ppl"))
    search = timed_cli("search", "--model", model, "--remove", REMOVE, "--algorithm", "heuristic",
                       "--out", str(scratch / "search"))
    record = json.loads((scratch / "search" / "search.json").read_text())
    original = lp.load_model(model)
    cuts = {}
    for label, layers in plain_cuts(record).items():
        working = original.copy(share_weights=True)
        lp.prune(working, layers)
        cuts[label] = {"removed_layers": layers, "test_ppl": test_ppl(working)}
    ppl_cut = lp.load_model(scratch / "ppl")
    cuts["prune --metric ppl"] = {"removed_layers": ppl_cut.lineage["removed_layers"], "test_ppl": test_ppl(ppl_cut)}
    winner = record["candidates"][record["winner"]]
    return {"model": model, "layers": record["num_layers"], "remove": record["remove"], "prune": prune,
            "search": search, "search_seconds_inside": record["seconds"], "candidates": len(record["candidates"]),
            "dropped": sum(c["dropped_early"] for c in record["candidates"]),
            "winner": record["winner_label"], "winner_layers": winner["removed_layers"],
            "winner_validation_ppl": winner["held_out_ppl"],
            "winner_test_ppl": test_ppl(lp.load_model(scratch / "search" / "model")),
            "winner_speedup": winner["measured_decode_speedup"], "cuts": cuts,
            "date": dt.date.today().isoformat()}


def render(results: list[dict[str, Any]]) -> str:
    lines = [(f"`layerprune search --remove {REMOVE} --algorithm heuristic` (default data and budget) against "
              "`layerprune prune --metric "
              f"ppl --remove {REMOVE}` on the same data: wall-clock of each command as typed (a child process, "
              "loading and saving included), one after the other. Perplexity on the wiki-sample test split "
              f"({EVAL_WINDOWS} windows of {EVAL_WINDOW} tokens), which neither calibration (train) nor the "
              "search's ranking (validation) reads. Produced by `python benchmarks/bench_search.py`; "
              f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
              f"{transformers.__version__}."), "",
             ("| model | removed | prune --metric ppl (s) | search (s) | ratio | candidates (dropped early) | winner | "
              "winner test ppl | best single-metric cut (test ppl) | winner at least as good |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cuts = r["cuts"]
        best = min(cuts, key=lambda label: cuts[label]["test_ppl"])
        lines.append(f"| {r['model']} | {r['remove']} of {r['layers']} | {r['prune']['seconds']:.0f} | "
                     f"{r['search']['seconds']:.0f} | {r['search']['seconds'] / r['prune']['seconds']:.2f}x | "
                     f"{r['candidates']} ({r['dropped']}) | {r['winner']} | {r['winner_test_ppl']:.2f} | "
                     f"{best} ({cuts[best]['test_ppl']:.2f}) | "
                     f"{'yes' if r['winner_test_ppl'] <= cuts[best]['test_ppl'] else 'no'} |")
    lines += ["", "Measured on " + ", ".join(f"{r['model']} {r['date']} (1-minute load average before the prune "
                                             f"{r['prune']['load_before']}, before the search "
                                             f"{r['search']['load_before']})" for r in results) + ".", "",
              "Every single-metric cut (plain removal), test-split perplexity:", ""]
    for r in results:
        ordered = sorted(r["cuts"].items(), key=lambda item: item[1]["test_ppl"])
        lines.append(f"- {r['model']}: " + "; ".join(f"{label} {cut['test_ppl']:.2f}" for label, cut in ordered))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--again", action="store_true", help="measure again the models already measured")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    results_file = cache_dir() / "bench-search" / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.exists() else {}
    for model in args.models.split(","):
        if model in results and not args.again:
            print(f"{model}: already measured (--again to redo)")
            continue
        with tempfile.TemporaryDirectory(prefix="bench-search-") as scratch:
            results[model] = bench(model, Path(scratch))
        write_json_atomic(results_file, results, overwrite=True)
        print(json.dumps(results[model], indent=1))
    if not args.no_doc and results:
        ordered = [results[m] for m in MODELS if m in results]
        update_doc_section(DOC, "## Search", "### Search against the single ppl cut", render(ordered))
        print(f"wrote the Search section of {DOC}")


if __name__ == "__main__":
    main()
