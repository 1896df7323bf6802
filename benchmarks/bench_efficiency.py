"""Efficiency benchmark: SmolLM2-135M original vs the same model with layers removed, measured in
one run (interleaved, warm-up, median of repeats), with the FLOP-ideal speed-up beside the
measured one.

    python benchmarks/bench_efficiency.py              # writes ### Efficiency in docs/benchmarks.md
    python benchmarks/bench_efficiency.py --remove 6 --new-tokens 128 --repeats 7

The results JSON goes to ``$LAYERPRUNE_CACHE/bench-evaluation/efficiency.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.evaluation.efficiency import Workload, measure_efficiency
from layerprune.outputs import write_json_atomic
from layerprune.reporting.eval_tables import comparison_table, update_doc_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, nargs="+", default=[6, 12], help="layer counts to remove (from the end)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    original = lp.load_model(args.model)
    layers = original.num_layers
    models = {f"{layers} layers (original)": original.model}
    for remove in args.remove:
        pruned = original.copy()
        # the second-to-last layers: which ones does not change the cost, and the last layer stays
        lp.prune(pruned, range(layers - 1 - remove, layers - 1))
        models[f"{layers - remove} layers"] = pruned.model
    workload = Workload(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    start = time.perf_counter()
    results = measure_efficiency(models, workload)
    seconds = time.perf_counter() - start
    report = {"reference": next(iter(models)),
              "models": {name: {"parameters": values["parameters"], "efficiency": values}
                         for name, values in results.items()},
              "settings": {"model": args.model, "workload": vars(workload), "torch_threads": torch.get_num_threads(),
                           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                           "seconds": round(seconds, 1)}}
    write_json_atomic(cache_dir() / "bench-evaluation" / "efficiency.json", report)
    table = comparison_table(report)
    print(table)
    bar = {name: values["decode_speedup"] / values["decode_ideal_speedup"] for name, values in results.items()}
    print("decode speed-up / FLOP-ideal:", {name: round(value, 3) for name, value in bar.items()})
    if not args.no_doc:
        ratios = "; ".join(f"{name}: {value:.2f}" for name, value in list(bar.items())[1:])
        body = (f"`python benchmarks/bench_efficiency.py` — {args.model}, batch 1, prompt {args.prompt_len} tokens, "
                f"{args.new_tokens} greedy decode steps with the KV cache, float32 on CPU "
                f"({report['settings']['machine']}, {torch.get_num_threads()} torch threads, machine shared with "
                f"other jobs), warm-up 1, median of {args.repeats} interleaved repeats; {seconds:.0f} s in all. "
                "Pruned models drop the second-to-last layers. FLOP-ideal = FLOPs per token of the original / the "
                "pruned (layers, attention over the cache, LM head). Peak memory: growth of a fresh process's "
                "peak RSS over its RSS after imports, while loading the checkpoint and running the workload.\n\n"
                f"{table}\nMeasured decode speed-up / FLOP-ideal speed-up: {ratios} (bar: ≥ 0.9).")
        update_doc_section(DOC, "## Evaluation", "### Efficiency", body)


if __name__ == "__main__":
    main()
