"""How much healing buys: healing tokens against fidelity on SmolLM2's best 25% cut (issue #33 part 5).

    python benchmarks/healing_budget.py                     # every point this machine has not measured yet
    python benchmarks/healing_budget.py --budgets 10240     # only the cheapest points
    python benchmarks/healing_budget.py --budgets 655360 --methods lora --data wiki   # one line's next point
    python benchmarks/healing_budget.py --device cuda --budgets 655360   # the far end, on a GPU
    python benchmarks/healing_budget.py --budgets ''        # only the table and figure, from the kept points

SmolLM2-135M-Instruct with the 8 layers of lowest block influence removed (``bi``, ``independent``:
the best single-metric 25% cut of docs/benchmarks.md § Compensation, perplexity 133.5) is healed
with LoRA (rank 8) and with LoRA plus distillation from the original (KL weight 0.5), each on
``wiki-sample`` text and on self-generated data (the original's greedy continuations of 32-token
``wiki-sample`` prompts, ``heal --data self-generated``), at budgets spaced x4 from 10,240 training
tokens (128-token rows, 8 a step). Each healed model is compared with the original on the first
16 windows of 256 tokens of the ``wiki-sample`` test split: KL(original || healed) and top-1
agreement (``eval --fidelity``) and held-out perplexity, on the same windows.

A point is one process-local run kept as JSON in ``benchmarks/results/healing-budget/`` with its
wall-clock seconds, the self-generated points' generation included (their rows differ per budget,
so each generates its own). The points are committed, not cached: the far end of the curve takes
hours, so a killed benchmark, a later session or a lent GPU adds points where the last one stopped
(the self-generated continuations themselves stay in the user cache dir: they are the source text's
words). The table and the figure (``docs/figures/healing-budget.png``: x tokens, log; y KL and
perplexity; a line per method and data) are rewritten from every kept point.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

import layerprune as lp
from layerprune.evaluation.fidelity import dataset_fidelity
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.options import comma_choices
from layerprune.outputs import write_bytes_atomic, write_json_atomic
from layerprune.reporting.eval_tables import update_doc_section
from layerprune.reporting.figures import png_bytes

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
FIGURE = ROOT / "docs" / "figures" / "healing-budget.png"
MODEL = "smollm2-135m"
DATA = "wiki-sample"
REMOVE = "25%"
SEQ_LEN, BATCH = 128, 8
BUDGETS = tuple(10_240 * 4 ** k for k in range(4))
"""Training tokens: 10, 40, 160 and 640 steps of 8 x 128 tokens."""
METHODS = {"lora": dict(method="lora", lora_rank=8, lr=1e-3),
           "lora+distill": dict(method="lora", lora_rank=8, lr=1e-3, distill=True)}
SOURCES = {"wiki": dict(data=DATA), "self-generated": dict(data="self-generated", prompts=DATA, prompt_tokens=32)}
EVAL = dict(seq_len=256, max_windows=16)


def results_dir() -> Path:
    folder = ROOT / "benchmarks" / "results" / "healing-budget"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cut(original: lp.LoadedModel) -> list[int]:
    """The layers removed: ``bi``'s 25% (independent), scored once and kept with the points."""
    from layerprune.data import build_calibration
    from layerprune.scoring.report import score
    from layerprune.selection import select

    path = results_dir() / "cut.json"
    if path.is_file():
        return json.loads(path.read_text())
    calibration = build_calibration(original.tokenizer, DATA, split="train", samples=32, seq_len=256)
    removed = select(score(original, calibration, ["bi"]), REMOVE, "independent", "bi").remove
    write_json_atomic(path, removed)
    return removed


def closeness(original: lp.LoadedModel, model: lp.LoadedModel) -> dict[str, Any]:
    """KL, top-1 agreement and perplexity of ``model`` on the held-out windows."""
    fidelity = dataset_fidelity(original.model, {"model": model.model}, original.tokenizer, DATA,
                                EVAL["seq_len"], batch_size=4, max_windows=EVAL["max_windows"])["model"]
    ppl = dataset_perplexity(model.model, original.tokenizer, DATA, EVAL["seq_len"], batch_size=4,
                             max_windows=EVAL["max_windows"])
    measured = fidelity.as_dict()
    eval_tokens = measured.pop("tokens")  # the tokens compared; a point's "tokens" are its training tokens
    return {**measured, "eval_tokens": eval_tokens, "ppl": ppl.ppl}


def run_point(original: lp.LoadedModel, removed: list[int], method: str, source: str, tokens: int,
              device: str) -> dict[str, Any]:
    """Heal a fresh copy of the cut at one budget and measure it, kept by method, data, tokens and device."""
    path = results_dir() / f"{method}-{source}-{tokens}-{device}.json"
    if path.is_file():
        return json.loads(path.read_text())
    pruned = original.copy()
    lp.prune(pruned, removed)
    began = time.perf_counter()
    healed = lp.heal(pruned, **METHODS[method], **SOURCES[source], original=original, steps=tokens // (SEQ_LEN * BATCH),
                     batch_size=BATCH, seq_len=SEQ_LEN)
    seconds = time.perf_counter() - began
    entry = healed.lineage["healing"][-1]
    result = {"method": method, "data": source, "tokens": tokens, "device": device, "heal_seconds": round(seconds, 1),
              "generated_tokens": entry["data"].get("generated_tokens"), **closeness(original, healed)}
    write_json_atomic(path, result)
    return result


def render(points: list[dict[str, Any]], baseline: dict[str, Any], machine: str) -> str:
    """The § Fidelity table: the unhealed cut, then every measured point by method, data and tokens."""
    lines = [f"Measured with `python benchmarks/healing_budget.py` ({machine}). SmolLM2-135M-Instruct without "
             f"layers {', '.join(map(str, baseline['removed']))} (bi, independent, 25%); KL(original || "
             f"model) in nats per token, top-1 agreement and perplexity on the first {EVAL['max_windows']} windows of "
             f"{EVAL['seq_len']} tokens of the {DATA} test split. Seconds: the healing's wall clock, generation of "
             "self-generated data included; a later method at the same budget reads the first one's cached "
             "continuations (the same prompts and settings). They vary with the machine's load: read them as "
             "the cost of a point on that machine, not as a ratio between methods. Trained on: the tokens the loss "
             "reads; a self-generated row trains on the original's continuation only (its prompt is context), so "
             "at the same training tokens it teaches fewer.", "",
             "| method | data | training tokens | KL | top-1 agreement | ppl | trained on | heal seconds | device |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|",
             f"| unhealed | – | 0 | {baseline['kl']:.3f} | {baseline['top1_agreement']:.3f} | {baseline['ppl']:.1f} | – "
             "| – | – |"]
    for p in sorted(points, key=lambda p: (p["method"], p["data"], p["tokens"])):
        trained_on = p["tokens"] if p.get("generated_tokens") is None else p["generated_tokens"]
        lines.append(f"| {p['method']} | {p['data']} | {p['tokens']:,} | {p['kl']:.3f} | {p['top1_agreement']:.3f} "
                     f"| {p['ppl']:.1f} | {trained_on:,} | {p['heal_seconds']} | {p['device']} |")
    return "\n".join(lines) + "\n\n![healing budget](figures/healing-budget.png)\n"


def figure(points: list[dict[str, Any]], baseline: dict[str, Any]) -> Any:
    """Two panels over healing tokens (log): KL to the original and held-out perplexity, a line per
    method and data, the unhealed cut dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for axis, key, label in ((axes[0], "kl", "KL(original || healed), nats per token"),
                             (axes[1], "ppl", "held-out perplexity")):
        for method in METHODS:
            for source in SOURCES:
                line = sorted((p["tokens"], p[key]) for p in points if (p["method"], p["data"]) == (method, source))
                if line:
                    axis.plot(*zip(*line), marker="o", label=f"{method} on {source}")
        axis.axhline(baseline[key], color="grey", linestyle=":", label="unhealed cut")
        axis.set_xscale("log")
        axis.set_xlabel("healing tokens (log)")
        axis.set_ylabel(label)
    axes[0].set_title("distance from the original (lower is better)", fontsize=10)
    axes[1].set_title("perplexity (lower is better)", fontsize=10)
    axes[0].legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=lambda text: [int(t) for t in text.split(",") if t.strip()],
                        default=list(BUDGETS), help="training-token budgets to run, comma-separated (default: all; "
                                                    "empty: none, only rewrite the table and figure from the kept points)")
    parser.add_argument("--methods", type=comma_choices(METHODS), default=list(METHODS),
                        help=f"healing methods to run, comma-separated (default: {','.join(METHODS)})")
    parser.add_argument("--data", type=comma_choices(SOURCES), default=list(SOURCES),
                        help=f"training data to run, comma-separated (default: {','.join(SOURCES)}); a far point "
                             "takes an hour on a CPU, so one line at a time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-doc", action="store_true", help="measure only; leave docs/benchmarks.md as it is")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    original = lp.load_model(MODEL, device=args.device)
    removed = cut(original)
    baseline_path = results_dir() / "unhealed.json"
    if not baseline_path.is_file():
        pruned = original.copy()
        lp.prune(pruned, removed)
        write_json_atomic(baseline_path, {"removed": removed, **closeness(original, pruned)})
    baseline = json.loads(baseline_path.read_text())
    for tokens in args.budgets:
        for method in args.methods:
            for source in args.data:
                point = run_point(original, removed, method, source, tokens, args.device)
                print(json.dumps(point), flush=True)
    if not args.no_doc:
        points = [json.loads(path.read_text()) for path in sorted(results_dir().glob("*-*-*.json"))
                  if path.name not in ("cut.json", "unhealed.json")]
        machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        update_doc_section(DOC, "## Fidelity", "### Healing budget", render(points, baseline, machine))
        write_bytes_atomic(FIGURE, png_bytes(figure(points, baseline), dpi=120))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
