"""Evolutionary search benchmark: ``layerprune search --algorithm evolution`` against the heuristic search and
the cheap single-metric cuts, at 25% whole layers (docs/benchmarks.md § Evolutionary search).

    nice -n 5 python benchmarks/evolution.py                         # smollm2-135m, 8 min per search
    python benchmarks/evolution.py --models gemma3-270m --minutes 8  # one more model (results kept per model)

Per model, three steps, each saved under ``$LAYERPRUNE_CACHE/bench-evolution/`` once done, so a run cut
off resumes at the step it was in:

1. ``layerprune search --remove 25% --no-repair --time-budget M`` (heuristic, today's default) and the
   same with ``--algorithm evolution``, each the command a user types (a child process, loading
   included), one after the other, the 1-minute load average before each: the same wall-clock budget;
2. the cheap single-metric cuts (``bi``, ``angular``, ``block-cosine``, each its independent
   selection, i.e. ``layerprune prune --metric M``) on the same default calibration rows;
3. every cut, plain (no repair), on held-out text that neither the calibration (train) nor the
   searches' ranking (validation) read: the wiki-sample *test* split, perplexity and the exact mean
   KL(original || cut) per predicted token, every cut read on the same windows as the original.

Beside them, the evolution's work from its ``search.json`` trace: tokens forwarded per generation, and
the share of layer evaluations saved by the cached prefixes (against running every kept layer) and
by multi-stage selection, early stopping and the cache (against every contender on every batch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.data import text_prefix, token_stream
from layerprune.outputs import write_json_atomic
from layerprune.reporting.eval_tables import update_doc_section
from layerprune.searching.ranking import held_out_windows

MODELS = ("smollm2-135m", "gemma3-270m")
REMOVE = "25%"
CHEAP = ("bi", "angular", "block-cosine")
EVAL_WINDOW = 256
EVAL_WINDOWS = 32
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def timed_search(model: str, out: Path, minutes: float, *extra: str) -> dict[str, Any]:
    """One ``layerprune search`` as typed, its wall-clock and the load before it, and its record."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "layerprune.cli.main", "search", "--model", model, "--remove", REMOVE,
                    "--no-repair", "--time-budget", f"{minutes:g}", "--out", str(out), "--overwrite", *extra],
                   check=True)
    return {"seconds": round(time.perf_counter() - start, 1), "load_before": round(load, 2),
            **summary(json.loads((out / "search.json").read_text()))}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the benchmark keeps of a ``search.json``: the winner, what was ranked and left out, the trace."""
    winner = record["candidates"][record["winner"]]
    return {"seconds_inside": record["seconds"], "winner": record["winner_label"],
            "winner_layers": winner["removed_layers"], "candidates": len(record["candidates"]),
            "shortfall": record.get("shortfall"), "left_out": record.get("budget_left_out"),
            "metrics": record["metrics"], "evolution": record.get("evolution")}


def cheap_cuts(model: str) -> dict[str, Any]:
    """Each cheap metric's independent selection on the default calibration rows, and the seconds taken."""
    start = time.perf_counter()
    loaded = lp.load_model(model)
    rows = lp.build_calibration(loaded.tokenizer)
    report = lp.score(loaded, rows, list(CHEAP))
    cuts = {metric: lp.select(report, REMOVE, metric=metric).remove for metric in CHEAP}
    return {"cuts": cuts, "seconds": round(time.perf_counter() - start, 1)}


def held_out(model: str, cuts: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Test-split perplexity and mean KL(original || cut) of every cut, on the same windows (the
    original's distributions computed once per batch and compared with each cut's there)."""
    original = lp.load_model(model)
    prefix = text_prefix(original.tokenizer)
    windows = held_out_windows(token_stream(original.tokenizer, "wiki-sample", "test"), EVAL_WINDOW, prefix,
                               EVAL_WINDOWS)
    first = max(len(prefix), 1)
    models = {"original": original}
    for label, layers in cuts.items():
        working = original.copy(share_weights=True)
        lp.prune(working, layers)
        models[label] = working
    sums = {label: {"nll": 0.0, "kl": 0.0} for label in models}
    positions = 0
    with torch.inference_mode():
        for start in range(0, len(windows), 4):
            batch = torch.stack(windows[start:start + 4])
            targets = batch[:, first:]
            reference = None
            for label, loaded in models.items():
                log_q = torch.log_softmax(loaded.model(input_ids=batch).logits[:, first - 1:-1].float(), dim=-1)
                sums[label]["nll"] += float(-log_q.gather(-1, targets[..., None]).sum())
                if reference is None:
                    reference = log_q
                sums[label]["kl"] += float((reference.exp() * (reference - log_q)).sum())
            positions += targets.numel()
    return {label: {"ppl": round(float(torch.exp(torch.tensor(s["nll"] / positions))), 3),
                    "kl": round(s["kl"] / positions, 5)} for label, s in sums.items()}


def work(evolution: dict[str, Any]) -> dict[str, Any]:
    """Tokens forwarded per generation and the shares of layer evaluations saved, from the trace."""
    trace = evolution["trace"]
    total = {key: sum(g[key] for g in trace) for key in ("tokens", "layer_tokens", "prefix_free_layer_tokens",
                                                         "naive_layer_tokens")}
    later = trace[1:]
    return {"generations": evolution["generations_run"], "stopped_by": evolution["stopped_by"],
            "initial_tokens": trace[0]["tokens"], "initial_seconds": trace[0]["seconds"],
            "tokens_per_generation": round(sum(g["tokens"] for g in later) / len(later)) if later else None,
            "seconds_per_generation": round(sum(g["seconds"] for g in later) / len(later), 1) if later else None,
            "improved": sum(g["improved"] for g in later),
            "saved_by_prefix": round(1 - total["layer_tokens"] / total["prefix_free_layer_tokens"], 3),
            "saved_by_stages_stops_cache": round(1 - total["prefix_free_layer_tokens"] / total["naive_layer_tokens"], 3),
            "saved_in_all": round(1 - total["layer_tokens"] / total["naive_layer_tokens"], 3),
            "best_heuristic_fitness": evolution["best_heuristic_fitness"],
            "best_fitness": trace[-1]["best_fitness"]}


def bench(model: str, minutes: float, state: dict[str, Any], save: Any) -> dict[str, Any]:
    """The steps not yet in ``state`` (saved after each by ``save``)."""
    folder = cache_dir() / "bench-evolution" / model
    state.setdefault("minutes", minutes)  # a run resumed with another budget starts again (main)
    if "heuristic" not in state:
        state["heuristic"] = timed_search(model, folder / "heuristic", minutes)
        save()
    if "evolution" not in state:
        state["evolution"] = timed_search(model, folder / "evolution", minutes, "--algorithm", "evolution")
        save()
    if "cheap" not in state:
        state["cheap"] = cheap_cuts(model)
        save()
    if "held_out" not in state:
        cuts = {"evolution winner": state["evolution"]["winner_layers"],
                "heuristic winner": state["heuristic"]["winner_layers"],
                **{f"{metric} (independent)": layers for metric, layers in state["cheap"]["cuts"].items()}}
        state["cuts"] = cuts
        state["held_out"] = held_out(model, cuts)
        state.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"), minutes=minutes,
                     load_after=round(os.getloadavg()[0], 2), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                     versions=f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                              f"{transformers.__version__}, layerprune {lp.__version__}")
        save()
    return state


def load_words(*loads: float) -> str:
    """What the load averages mean for a wall-clock budget, in words (the machine has few cores, so a
    load above one per core means each search got less of the CPU than an idle machine gives)."""
    cores = os.cpu_count() or 1
    if max(loads) <= cores / 2:
        return "; the machine was otherwise close to idle."
    return (f"; with {cores} cores, other work shared the machine (load up to {max(loads):g}), so a budget bought "
            "fewer generations and candidates than on an idle machine.")


def render(results: dict[str, dict[str, Any]]) -> str:
    lines = [(f"`layerprune search --remove {REMOVE} --no-repair --time-budget M` with `--algorithm evolution` "
              "against the heuristic search (today's default) at the same budget, each run as typed (a child "
              "process, loading included) one after the other, and the cheap single-metric cuts (each metric's "
              "independent selection on the default calibration rows). Every cut plain (no repair), read on the "
              f"wiki-sample test split ({EVAL_WINDOWS} windows of {EVAL_WINDOW} tokens; neither the calibration "
              "(train) nor the searches' ranking (validation) reads it): perplexity and the exact mean KL "
              "(original || cut) per predicted token. Produced by `python benchmarks/evolution.py`."), ""]
    for model, r in results.items():
        if "held_out" not in r:
            continue
        h, e = r["heuristic"], r["evolution"]
        lines += [f"#### {model}, {r['minutes']:g} min per search", "",
                  (f"{r['machine']}; {r['versions']}; {r['date']} UTC. 1-minute load average before the heuristic "
                   f"search {h['load_before']}, before the evolution {e['load_before']}, after the held-out reading "
                   f"{r['load_after']}" + load_words(h["load_before"], e["load_before"], r["load_after"])), "",
                  "| cut | removed layers | test ppl | KL to the original | search wall-clock (s) |",
                  "|---|---|---|---|---|",
                  f"| original | none | {r['held_out']['original']['ppl']:.2f} | 0 | |"]
        seconds = {"evolution winner": e["seconds"], "heuristic winner": h["seconds"]}
        for label, layers in sorted(r["cuts"].items(), key=lambda item: r["held_out"][item[0]]["ppl"]):
            got = r["held_out"][label]
            name = {"evolution winner": f"evolution winner ({e['winner']})",
                    "heuristic winner": f"heuristic winner ({h['winner']})"}.get(label, label)
            lines.append(f"| {name} | {','.join(map(str, layers))} | {got['ppl']:.2f} | {got['kl']:.4f} | "
                         f"{seconds.get(label, '')} |")
        w = work(e["evolution"])
        cheap_best = min(r["held_out"][label]["ppl"] for label in r["cuts"] if label.endswith("(independent)"))
        evolved = r["held_out"]["evolution winner"]["ppl"]
        lines += ["", (f"Evolution: {w['generations']} generations (ended by {w['stopped_by']}; "
                       f"{w['improved']} improved the parent), the initial population {w['initial_tokens']:,} tokens "
                       f"forwarded in {w['initial_seconds']:.0f} s, then "
                       + (f"{w['tokens_per_generation']:,} tokens and {w['seconds_per_generation']} s per generation"
                          if w["tokens_per_generation"] else "no generation")
                       + f"; fitness (KL on calibration rows) {w['best_fitness']:.4f} against the best heuristic "
                       f"selection's {w['best_heuristic_fitness']:.4f}. Layer evaluations saved: "
                       f"{w['saved_by_prefix']:.0%} by the cached prefixes, {w['saved_by_stages_stops_cache']:.0%} by "
                       f"multi-stage selection, early stopping and the cache, {w['saved_in_all']:.0%} in all. The "
                       f"heuristic search ranked {h['candidates']} candidate(s)"
                       + (f" ({h['shortfall']})" if h["shortfall"] else "") + f", the evolution {e['candidates']}"
                       + (f" ({e['shortfall']})" if e["shortfall"] else "") + "."),
                  "", (f"Goal (issue 32): the evolved cut at least 10% lower test perplexity than every cheap cut "
                       f"({evolved:.2f} against {cheap_best:.2f}: "
                       f"{'met' if evolved <= 0.9 * cheap_best else 'not met'}) and lower than the heuristic "
                       f"search's plain winner ({r['held_out']['heuristic winner']['ppl']:.2f}: "
                       f"{'met' if evolved < r['held_out']['heuristic winner']['ppl'] else 'not met'})."), ""]
        lines += [r["note"], ""] if r.get("note") else []
    return "\n".join(lines).rstrip()


RESULTS = cache_dir() / "bench-evolution" / "results.json"
"""Each model's steps as they finish (a run resumes at the first step missing)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS[0], help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--minutes", type=float, default=8.0, help="each search's --time-budget")
    parser.add_argument("--again", action="store_true", help="measure again from the first step")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for model in args.models.split(","):
        if args.again or results.get(model, {}).get("minutes") not in (None, args.minutes):  # another budget
            results[model] = {}
        state = results.setdefault(model, {})
        bench(model, args.minutes, state, lambda: write_json_atomic(RESULTS, results, overwrite=True))
        print(json.dumps({k: v for k, v in state.items() if k != "evolution"}, indent=1, default=str))
    if not args.no_doc and results:
        update_doc_section(DOC, "## Search", "### Evolutionary search", render(results))
        print(f"wrote the Evolutionary search section of {DOC}")


if __name__ == "__main__":
    main()
