"""Search benchmark: ``layerprune search --remove 8`` against ``layerprune prune --metric ppl --remove 8``
on the same (default) data, for SmolLM2-135M and Gemma-3-270M.

    python benchmarks/bench_search.py             # both models; writes docs/benchmarks.md § Search

Two claims of issue 18 are measured: the search takes at most 3x the time of the single ppl cut
(both as the command a user types, in a child process, wall-clock), and its winner is at least as
good on held-out text as every single-metric cut. "Held-out" here is the ``wiki-sample`` *test*
split, which neither the calibration (train) nor the search's ranking (validation) read, so the
winner is not judged on the text that chose it. Each single-metric cut is that metric's
independent selection, scored on the search's own calibration rows. The table replaces only the
``## Search`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import layerprune as lp
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.search import candidate_metrics

MODELS = ("smollm2-135m", "gemma3-270m")
REMOVE = 8
EVAL_WINDOW = 256
EVAL_WINDOWS = 32
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def timed_cli(*args: str) -> float:
    """Wall-clock seconds of one ``layerprune`` command in a child process (imports included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "layerprune.cli.main", *args], check=True)
    return time.perf_counter() - start


def test_ppl(loaded: lp.LoadedModel) -> float:
    return dataset_perplexity(loaded.model, loaded.tokenizer, "wiki-sample", EVAL_WINDOW,
                              max_windows=EVAL_WINDOWS).ppl


def single_metric_cuts(model: str) -> dict[str, float]:
    """Held-out (test split) perplexity of each candidate metric's independent cut of REMOVE layers."""
    loaded = lp.load_model(model)
    rows = lp.build_calibration(loaded.tokenizer, "wiki-sample", samples=64, seq_len=256)
    report = lp.score(loaded, rows, candidate_metrics())
    cuts = {}
    for metric in report.results:
        working = loaded.copy(share_weights=True)
        lp.prune(working, lp.select(report, REMOVE, "independent", metric).remove)
        cuts[metric] = test_ppl(working)
    return cuts


def bench(model: str, scratch: Path) -> dict[str, object]:
    prune_seconds = timed_cli("prune", "--model", model, "--metric", "ppl", "--remove", str(REMOVE),
                              "--out", str(scratch / f"{model}-ppl"))
    search_seconds = timed_cli("search", "--model", model, "--remove", str(REMOVE), "--out", str(scratch / model))
    record = json.loads((scratch / model / "search.json").read_text())
    winner = lp.load_model(scratch / model / "model")
    return {"model": model, "prune_seconds": prune_seconds, "search_seconds": search_seconds,
            "candidates": len(record["candidates"]), "winner": record["winner_label"],
            "winner_ppl": test_ppl(winner), "cuts": single_metric_cuts(model)}


def render(results: list[dict[str, object]]) -> str:
    lines = ["## Search", "",
             (f"`layerprune search --remove {REMOVE}` (default data and budget) against `layerprune prune --metric ppl "
              f"--remove {REMOVE}` on the same data; wall-clock of each command. Perplexity on the wiki-sample test "
              f"split ({EVAL_WINDOWS} windows of {EVAL_WINDOW} tokens), which neither calibration (train) nor the "
              "search's ranking (validation) reads. Produced by `python benchmarks/bench_search.py`."), "",
             ("| model | prune --metric ppl (s) | search (s) | ratio | candidates | winner | winner ppl | "
              "best single-metric cut (ppl) | winner at least as good |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cuts: dict[str, float] = r["cuts"]  # type: ignore[assignment]
        best = min(cuts, key=cuts.__getitem__)
        lines.append(f"| {r['model']} | {r['prune_seconds']:.0f} | {r['search_seconds']:.0f} | "
                     f"{r['search_seconds'] / r['prune_seconds']:.1f}x | {r['candidates']} | {r['winner']} | "
                     f"{r['winner_ppl']:.2f} | {best} ({cuts[best]:.2f}) | "
                     f"{'yes' if r['winner_ppl'] <= min(cuts.values()) else 'no'} |")
    lines += ["", "Every single-metric cut (independent selection), test-split perplexity:", ""]
    for r in results:
        cuts = r["cuts"]  # type: ignore[assignment]
        lines.append(f"- {r['model']}: " + ", ".join(f"{m} {p:.2f}" for m, p in sorted(cuts.items(), key=lambda x: x[1])))
    return "\n".join(lines) + "\n\n"


def write_section(text: str) -> None:
    """Replace only our section of the shared results file (other sections belong to others)."""
    current = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Search\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    updated = pattern.sub(lambda _: text, current) if pattern.search(current) else current.rstrip("\n") + "\n\n" + text
    DOC.write_text(updated)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-search-") as scratch:
        results = [bench(model, Path(scratch)) for model in MODELS]
    write_section(render(results))
    print(f"wrote the Search section of {DOC}")


if __name__ == "__main__":
    main()
