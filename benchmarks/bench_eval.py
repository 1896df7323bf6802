"""Loglikelihood scoring speed: lm-eval's HFLM against ours, which runs the LM head only at the
positions a request scores (``evaluation.scored_positions``), on the quick suite's own requests.

    python benchmarks/bench_eval.py                               # SmolLM2 and Gemma-3, --limit 20
    python benchmarks/bench_eval.py --models gemma3-270m --limit 50 --rounds 3

Per model: the requests of ``lp_offline`` (the first ``--limit`` examples of each task) are built
once; then the two scorers take turns on them, ``--rounds`` times each, so a change of the
machine's load hits both alike, and the speed-up is the ratio of their median times. The answers
are compared too: the largest log-likelihood difference and how many greedy flags differ.
Results go to docs/benchmarks.md § Evaluation ("Scoring only the asked positions").
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lm_eval
import torch
import transformers
from lm_eval.models.huggingface import HFLM

import layerprune as lp
from layerprune.evaluation.harness import expand_task_names, prepare_offline_tasks, task_manager
from layerprune.evaluation.scored_positions import ScoredPositionsLM
from layerprune.reporting.eval_tables import update_doc_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def suite_requests(limit: int) -> list[Any]:
    """The loglikelihood instances of every ``lp_offline`` task, first ``limit`` examples each."""
    names = expand_task_names(["lp_offline"])
    tasks = task_manager(prepare_offline_tasks(names), False).load(names)["tasks"]
    instances = []
    for task in tasks.values():
        task.build_all_requests(limit=limit)
        instances += [i for i in task.instances if i.request_type == "loglikelihood"]
    return instances


def compare(name: str, limit: int, rounds: int, batch_size: int) -> dict[str, Any]:
    """Time both scorers in turns on the same requests; report medians, ratio and agreement."""
    loaded = lp.load_model(name)
    instances = suite_requests(limit)
    scorers = {label: kind(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
               for label, kind in (("lm-eval HFLM", HFLM), ("scored positions", ScoredPositionsLM))}
    seconds: dict[str, list[float]] = {label: [] for label in scorers}
    answers: dict[str, list[tuple[float, bool]]] = {}
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for label, scorer in scorers.items():
            start = time.perf_counter()
            answers[label] = scorer.loglikelihood(instances, disable_tqdm=True)
            seconds[label].append(time.perf_counter() - start)
    baseline, fast = answers["lm-eval HFLM"], answers["scored positions"]
    medians = {label: statistics.median(times) for label, times in seconds.items()}
    return {"model": name, "requests": len(instances), "limit": limit, "rounds": rounds,
            "seconds": medians, "speedup": medians["lm-eval HFLM"] / medians["scored positions"],
            "max_loglik_difference": max(abs(a[0] - b[0]) for a, b in zip(baseline, fast)),
            "greedy_flags_differing": sum(a[1] != b[1] for a, b in zip(baseline, fast)),
            "load": (load_before, os.getloadavg()[0])}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | requests | lm-eval HFLM (s) | scored positions (s) | speed-up | max Δ log-likelihood | greedy flags differing | load (start → end) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['requests']:,} | {r['seconds']['lm-eval HFLM']:.1f} | "
                     f"{r['seconds']['scored positions']:.1f} | **{r['speedup']:.2f}×** | {r['max_loglik_difference']:.1e} | "
                     f"{r['greedy_flags_differing']} | {r['load'][0]:.2f} → {r['load'][1]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--limit", type=int, default=20, help="examples per task")
    parser.add_argument("--rounds", type=int, default=3, help="timed turns per scorer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    results = [compare(name, args.limit, args.rounds, args.batch_size) for name in args.models.split(",")]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (f"Measured {stamp} on {platform.machine()} with {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, lm-eval {lm_eval.__version__}; float32, batch "
            f"{args.batch_size}, the first {args.limit} examples of each `lp_offline` task, median of "
            f"{args.rounds} turns each (`python benchmarks/bench_eval.py --limit {args.limit} --rounds {args.rounds}`).\n\n"
            + table(results))
    print(body)
    if not args.no_doc:
        update_doc_section(DOC, "## Evaluation", "### Scoring only the asked positions", body)


if __name__ == "__main__":
    main()
