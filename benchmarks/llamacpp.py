"""llama.cpp as the runtime of a depth-pruned GGUF model: size, perplexity, CPU speed (docs/benchmarks.md § llama.cpp).

For SmolLM2-135M (Q4_1) and Gemma-3-270M (Q4_K_M), cut at 12/25/37% of the layers and written with
``--format gguf`` (every kept tensor in its own quantization), it measures the file size, the
perplexity in llama.cpp and in transformers on the same windows (llama.cpp's tokens of wiki-sample's
test split), and prefill/decode tokens/s at batch 1 in llama.cpp: the original and its cuts timed in
alternating turns in one process (:func:`layerprune.evaluation.llamacpp.speed`), each speed-up set beside
the FLOP-ideal one. SmolLM2's cuts are BI's (``prune --metric bi``, scored here on 32 x 128 tokens);
Gemma-3's are the study's best at each ratio (BI's layers 8-9 at 12%, the last 5 and the last 7 layers).

    PYTHONPATH=src python benchmarks/llamacpp.py [--windows 8] [--turns 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import llama_cpp
import torch
import transformers

import layerprune as lp
from layerprune.evaluation.efficiency import Workload
from layerprune.evaluation.llamacpp import LlamaCppConfig, open_model, perplexity, speed, text_tokens
from layerprune.evaluation.perplexity import perplexity as transformers_perplexity
from layerprune.models.aliases import MODEL_ALIASES, fetch_alias_gguf
from layerprune.models.gguf_file import GGUF_FILE, prune_gguf
from layerprune.reporting.eval_tables import update_doc_section

SEQ_LEN = 256
CUTS = {"smollm2-135m": {"12%": "bi", "25%": "bi", "37%": "bi"},
        "gemma3-270m": {"12%": [8, 9], "25%": list(range(13, 18)), "37%": list(range(11, 18))}}


def cut(alias: str, ratio: str, how: str | list[int], folder: Path) -> tuple[Path, list[int]]:
    out = folder / f"{alias}-{ratio.rstrip('%')}"
    if isinstance(how, list):
        prune_gguf(fetch_alias_gguf(MODEL_ALIASES[alias]), how, out, source_name=alias)
    else:
        subprocess.run([sys.executable, "-m", "layerprune.cli.main", "prune", "--model", alias, "--metric", how,
                        "--remove", ratio, "--samples", "32", "--seq-len", "128", "--format", "gguf", "--out", str(out)],
                       check=True, capture_output=True)
    return out / GGUF_FILE, json.loads((out / "layerprune.json").read_text())["removed_layers"]


def ppl_both(path: Path, windows: int, threads: int) -> tuple[float, float]:
    """Perplexity in llama.cpp and in transformers (de-quantized float32) on the same token windows."""
    llm = open_model(path, SEQ_LEN, threads, all_logits=True)
    ids, prefix = text_tokens(llm, "wiki-sample")
    ours = perplexity(llm, ids, SEQ_LEN, max_windows=windows, prefix=prefix).ppl
    llm.close()
    loaded = lp.load_model(str(path))
    theirs = transformers_perplexity(loaded.model, torch.tensor(ids), SEQ_LEN, max_windows=windows, prefix=prefix).ppl
    return ours, theirs


def fixed_share(alias: str, timed: list[dict[str, float]]) -> str:
    """Why the measured decode speed-up falls short of the FLOP-ideal one, from the timings themselves:
    a least-squares line of decode seconds per token against the weights each token multiplies
    (1 / the FLOP-ideal speed-up) over the original and its cuts. Its intercept is the per-token cost
    that removing layers does not touch (sampling, the logits copied out, llama.cpp's graph and thread
    set-up, the Python binding's calls); the larger its share, the further below the ideal a cut
    lands, since only the rest shrinks with the layers."""
    weights = torch.tensor([1 / row["ideal_speedup"] for row in timed], dtype=torch.float64)
    seconds = torch.tensor([1 / row["decode_tokens_per_s"] for row in timed], dtype=torch.float64)
    design = torch.stack([torch.ones_like(weights), weights], dim=1)
    fixed, per_weight = torch.linalg.lstsq(design, seconds[:, None]).solution.flatten().tolist()
    share = fixed / float(seconds[0])
    return (f"{alias}: decode seconds per token against the weights multiplied fit a line whose intercept, the "
            f"per-token cost pruning does not remove, is {fixed * 1e3:.2f} ms of the original's "
            f"{float(seconds[0]) * 1e3:.2f} ms ({share:.0%}); with it, a cut that keeps a share w of the weights "
            f"can reach at most 1 / ({share:.2f} + {1 - share:.2f}·w) of the original's decode speed.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows of 256 tokens")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args()
    settings = LlamaCppConfig(threads=args.threads, turns=args.turns)
    workload = Workload(prompt_len=128, new_tokens=64, repeats=2)
    lines: list[str] = []
    shortfalls: list[str] = []
    began, load_before = dt.datetime.now(dt.timezone.utc), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        for alias, cuts in CUTS.items():
            files = [(f"{alias} (original)", fetch_alias_gguf(MODEL_ALIASES[alias]), [])]
            files += [(f"{alias} -{ratio}", *cut(alias, ratio, how, Path(scratch))) for ratio, how in cuts.items()]
            timed = speed([path for _, path, _ in files], workload, settings)
            shortfalls.append(fixed_share(alias, timed))
            for (name, path, removed), measured in zip(files, timed):
                ours, theirs = ppl_both(path, args.windows, settings.thread_count)
                lines.append(f"| {name} | {removed or '-'} | {path.stat().st_size / 2**20:.1f} | {ours:.2f} | {theirs:.2f} | "
                             f"{measured['prefill_tokens_per_s']:.0f} | {measured['decode_tokens_per_s']:.1f} | "
                             f"{measured['prefill_speedup']:.2f} | {measured['decode_speedup']:.2f} | "
                             f"{measured['ideal_speedup']:.2f} |")
                print(lines[-1], flush=True)
    head = ["| model | removed layers | MB | ppl llama.cpp | ppl transformers | prefill tok/s | decode tok/s | "
            "prefill x | decode x | FLOP-ideal x |", "|---|---|---|---|---|---|---|---|---|---|"]
    body = "\n".join([*head, *lines]) + (
        f"\n\nwiki-sample test split, {args.windows} windows of {SEQ_LEN} tokens (llama.cpp's tokens, the same windows "
        f"in both runtimes; transformers runs the de-quantized float32 weights). Speed: prefill {workload.prompt_len} "
        f"tokens, then {workload.new_tokens} greedy decode steps, batch 1, {settings.thread_count} threads, "
        f"{args.turns} turns x {workload.repeats} repeats per model, the order alternating each turn; medians. "
        "Speed-ups are measured in the same run against the original; the FLOP-ideal one is the ratio of the weights "
        "each token multiplies (every tensor but the embedding lookup; attention over the context left out).\n\n"
        + " ".join(shortfalls) + " Prefill speed-ups can exceed the FLOP-ideal: llama.cpp computes the logits of the "
        "last prompt token only, so in prefill the LM head (tied to the embedding: 28M of SmolLM2's 135M parameters, "
        "168M of Gemma-3's 268M) is paid once per prompt rather than once per token, and the layers pruning removes "
        "are a larger share of the work than the per-token ideal counts.\n\n"
        f"`python benchmarks/llamacpp.py --windows {args.windows} --turns {args.turns}`, {began:%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, 1-min load {load_before:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end (other work shared the machine: the ratios, timed in alternating turns, "
        f"bear it alike); llama-cpp-python {llama_cpp.__version__}, gguf {importlib.metadata.version('gguf')}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, layerprune {lp.__version__}.\n")
    update_doc_section(Path(args.doc), "## llama.cpp", "### Size, perplexity and CPU speed of GGUF cuts", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
