"""Classification depth curve (Why Lift so Heavy): SmolLM2-135M cut to its first k layers and
fine-tuned for Rotten Tomatoes sentiment, with the LM head + verbalizer and with a classification
head; accuracy against k as a table, a PNG plot and JSON.

    python benchmarks/bench_classification.py                 # sentiment, offline
    python benchmarks/bench_classification.py --data reuters-r8 --template $'Article: {text}\\nTopic:'

Each k is one call of ``classification_curve`` whose result is saved at once under
``$LAYERPRUNE_CACHE/bench-evaluation/``, so an interrupted run resumes at the next k and the
table and plot always show what is finished. Wall time per k and in all is reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.data import load_labelled
from layerprune.evaluation.classification import ClassificationSettings, classification_curve
from layerprune.outputs import write_bytes_atomic, write_json_atomic
from layerprune.reporting.eval_tables import curve_plot, curve_table, update_doc_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
FIGURES = DOC.parent / "figures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="rotten-tomatoes")
    parser.add_argument("--template", default="Review: {text}\nSentiment:")
    parser.add_argument("--k", default="1,2,4,8,16,30")
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    ks = [int(k) for k in args.k.split(",")]
    base = dict(train_size=args.train_size, test_size=args.test_size, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, head_lr=args.head_lr, max_tokens=args.max_tokens, template=args.template)
    ClassificationSettings(ks=tuple(ks), **base).check()
    folder = cache_dir() / "bench-evaluation"
    stem = f"classification-{args.model}-{args.data}"
    results_file = folder / f"{stem}.json"
    curve = load_curve(results_file, base)
    loaded = lp.load_model(args.model)
    train, test = load_labelled(args.data, "train"), load_labelled(args.data, "test")
    for k in ks:
        if curve and str(k) in curve["accuracy"]["head"]:
            continue  # finished in an earlier run
        start, cpu_start = time.perf_counter(), time.process_time()
        one = classification_curve(loaded, train, test, ClassificationSettings(ks=(k,), **base))
        one["wall_seconds"] = {str(k): round(time.perf_counter() - start, 1)}
        one["cpu_seconds"] = {str(k): round(time.process_time() - cpu_start, 1)}  # not inflated by other jobs
        curve = one if curve is None else merge(curve, one)
        curve["dataset"] = args.data
        write_json_atomic(results_file, curve)
        print(f"k={k}: {[(kind, curve['accuracy'][kind][str(k)]) for kind in curve['accuracy']]} "
              f"({one['wall_seconds'][str(k)]} s)", flush=True)
    assert curve is not None
    title = f"{args.model}, {args.data}: accuracy vs first k layers"
    table = curve_table(curve)
    write_bytes_atomic(folder / f"{stem}.md", table.encode())
    png = write_bytes_atomic(FIGURES / f"{stem}.png", curve_plot(curve, title))
    total = sum(curve["wall_seconds"].values())
    print(table + f"\ntotal wall time {total / 60:.1f} min; plot {png}")
    if not args.no_doc:
        body = (f"`python benchmarks/bench_classification.py` — {args.model} cut to its first k layers, fine-tuned on "
                f"{curve['train_examples']} {args.data} training examples for {args.epochs} epoch(s) (AdamW lr "
                f"{args.lr}, batch {args.batch_size}, prompts cut to {args.max_tokens} tokens, embeddings frozen), "
                f"accuracy on {curve['test_examples']} test examples (chance/majority {curve['chance']:.3f}). "
                f"Wall time {total / 60:.1f} min{cpu_note(curve)} with {torch.get_num_threads()} torch thread(s) on a "
                f"2-core CPU shared with other jobs.\n\n"
                f"![{stem}](figures/{stem}.png)\n\n{table}")
        update_doc_section(DOC, "## Evaluation", f"### Classification depth curve ({args.data})", body)


def load_curve(path: Path, settings: dict) -> dict | None:
    """The curve saved by an earlier, possibly interrupted, run with the same settings (else start afresh)."""
    if not path.exists():
        return None
    curve = json.loads(path.read_text())
    return curve if all(curve["settings"].get(key) == value for key, value in settings.items()) else None


def cpu_note(curve: dict) -> str:
    """The CPU time, where every k of the curve recorded it (older runs did not)."""
    cpu = curve.get("cpu_seconds", {})
    return f", CPU time {sum(cpu.values()) / 60:.1f} min" if cpu.keys() == curve["wall_seconds"].keys() else ""


def merge(curve: dict, one: dict) -> dict:
    """Add one k's accuracies and timings to the curve so far."""
    for key in ("accuracy", "seconds"):
        for kind, by_k in one[key].items():
            curve[key][kind].update(by_k)
    curve["wall_seconds"].update(one["wall_seconds"])
    curve.setdefault("cpu_seconds", {}).update(one["cpu_seconds"])
    return curve


if __name__ == "__main__":
    main()
