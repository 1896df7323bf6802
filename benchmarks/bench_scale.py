"""Scale benchmark: peak memory of shard surgery and of layer-streaming scoring.

    python benchmarks/bench_scale.py                     # both parts; writes ## Scale in docs/benchmarks.md
    python benchmarks/bench_scale.py --part shards --big-layers 22
    python benchmarks/bench_scale.py --part streaming --rows 16 --seq-len 512

Every measured step runs in a fresh child process that first imports what it needs, then records
its RSS (the baseline: interpreter, torch, transformers), does the work, and reports its peak
(``VmHWM``; ``ru_maxrss`` survives ``exec`` and could report the parent's peak). Shard surgery is
measured on SmolLM2-135M saved in 100 MB shards and on a random Llama of several GB written here
shard by shard (deleted afterwards). Streaming and in-memory scoring run on the same calibration
rows (saved once by the parent) with the same options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
MiB = 2**20


def _child(argv: list[str]) -> None:
    """Run one measured step and print its memory as JSON (imports first, so they are baseline)."""
    kind = argv[0]
    from layerprune.evaluation.efficiency import status_bytes
    from layerprune.models.shards import prune_checkpoint
    from layerprune.scoring import score
    from layerprune.scoring.streaming import stream_score
    import layerprune as lp

    baseline = status_bytes("VmRSS")
    start = time.perf_counter()
    if kind == "prune":
        source, out, layers = argv[1], argv[2], [int(i) for i in argv[3].split(",")]
        prune_checkpoint(source, layers, out)
    else:
        folder, rows_file, metrics, batch = argv[1], argv[2], argv[3], int(argv[4])
        rows = torch.load(rows_file, weights_only=True)
        if kind == "memory":
            report = score(lp.load_model(folder), rows, metrics, batch_size=batch)
        else:
            spill = Path(argv[5])
            report = stream_score(folder, rows, metrics, batch_size=batch, spill_dir=spill)
        torch.save({name: r.importance for name, r in report.results.items()}, Path(rows_file).with_suffix(f".{kind}"))
    print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM"), "seconds": time.perf_counter() - start}))


def measure(*argv: str) -> dict[str, float]:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_shard(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.glob("*.safetensors"))


def save_sharded_smollm2(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.models.aliases import resolve_alias

    if not (folder / "config.json").is_file():
        source = resolve_alias("smollm2-135m")
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(folder, max_shard_size="100MB")
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def write_random_llama(folder: Path, layers: int, shard_bytes: int = 2**30) -> Path:
    """A random float32 Llama (TinyLlama's shape) written one ~1 GiB shard at a time, never whole."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for k, names in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: torch.randn(shapes[n], generator=generator) * 0.02 for n in names}, folder / file,
                  metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(4 * int(torch.Size(s).numel()) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config.save_pretrained(folder)
    return folder


def bench_shards(work: Path, big_layers: int) -> list[dict]:
    rows = []
    cases = [("SmolLM2-135M, 100 MB shards", save_sharded_smollm2(work / "smollm2-sharded"), [3, 10, 11, 25])]
    big = work / "random-llama"
    shutil.rmtree(big, ignore_errors=True)
    cases.append((f"random Llama, {big_layers} layers", write_random_llama(big, big_layers),
                  list(range(big_layers - 6, big_layers - 1))))
    try:
        for label, folder, layers in cases:
            out = work / "pruned"
            shutil.rmtree(out, ignore_errors=True)
            result = measure("prune", str(folder), str(out), ",".join(map(str, layers)))
            rows.append({"case": label, "checkpoint_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
                         "shards": len(list(folder.glob("*.safetensors"))), "largest_shard": largest_shard(folder),
                         "removed": len(layers), **result})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(big, ignore_errors=True)
    return rows


def calibration_rows(folder: Path, rows: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from layerprune.data import build_calibration

    return build_calibration(AutoTokenizer.from_pretrained(folder), "wiki-sample", samples=rows,
                             seq_len=seq_len).input_ids


def bench_streaming(work: Path, rows: int, seq_len: int, batch: int, stream_batches: list[int],
                    metrics: str) -> dict:
    folder = save_sharded_smollm2(work / "smollm2-sharded")
    rows_file = work / f"rows-{rows}x{seq_len}.pt"
    torch.save(calibration_rows(folder, rows, seq_len), rows_file)
    spill = work / "spill"
    spill.mkdir(exist_ok=True)
    memory = measure("memory", str(folder), str(rows_file), metrics, str(batch))
    reference = torch.load(rows_file.with_suffix(".memory"))
    streaming = {}
    for stream_batch in stream_batches:
        streaming[stream_batch] = measure("streaming", str(folder), str(rows_file), metrics, str(stream_batch),
                                          str(spill))
        got = torch.load(rows_file.with_suffix(".streaming"))
        streaming[stream_batch]["max_abs_difference"] = max(
            abs(x - y) for name in reference for x, y in zip(reference[name], got[name]))
    return {"rows": rows, "seq_len": seq_len, "batch": batch, "metrics": metrics, "memory": memory,
            "streaming": streaming}


def render_shards(rows: list[dict]) -> str:
    lines = [
        "`python benchmarks/bench_scale.py --part shards` — `prune_checkpoint` (what `layerprune prune --low-memory` "
        "runs) in a fresh process; baseline = its RSS after importing torch/transformers/layerprune, peak = VmHWM.",
        "",
        "| checkpoint | size | shards | largest shard | layers removed | baseline RSS | peak RSS | peak − baseline | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['checkpoint_bytes'] / MiB:,.0f} MiB | {r['shards']} | "
                     f"{r['largest_shard'] / MiB:,.0f} MiB | {r['removed']} | {r['baseline'] / MiB:.0f} MiB | "
                     f"{r['peak'] / MiB:.0f} MiB | {(r['peak'] - r['baseline']) / MiB:.1f} MiB | {r['seconds']:.1f} s |")
    lines += ["", "Tensors are copied between files by the kernel (`os.copy_file_range`), so the work adds only "
              "megabytes over the import baseline, whatever the shard size."]
    return "\n".join(lines)


def render_streaming(r: dict) -> str:
    memory = r["memory"]
    lines = [
        f"`python benchmarks/bench_scale.py --part streaming` — SmolLM2-135M float32 (100 MB shards), "
        f"{r['rows']} wiki-sample rows × {r['seq_len']} tokens, metrics `{r['metrics']}`, each path in a fresh "
        "process of the same run; streaming spills activations to disk (`spill_dir`). Batch size is the rows "
        "pushed through a layer at once: it trades speed for activation memory, and does not change the scores.",
        "",
        "| path | batch | baseline RSS | peak RSS | peak − baseline | peak / in-memory peak | time | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
        f"| in memory (`score`) | {r['batch']} | {memory['baseline'] / MiB:.0f} MiB | {memory['peak'] / MiB:.0f} MiB | "
        f"{(memory['peak'] - memory['baseline']) / MiB:.0f} MiB | 1 | {memory['seconds']:.0f} s | — |",
    ]
    for batch, m in r["streaming"].items():
        lines.append(
            f"| layer streaming (`stream_score`) | {batch} | {m['baseline'] / MiB:.0f} MiB | {m['peak'] / MiB:.0f} MiB | "
            f"{(m['peak'] - m['baseline']) / MiB:.0f} MiB | **{m['peak'] / memory['peak']:.2f}** | "
            f"{m['seconds']:.0f} s | {m['max_abs_difference']:.1e} |")
    lines += ["", "Baseline = the process's RSS after importing torch and transformers, before any work; it is "
              "the floor of every row."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["shards", "streaming", "all"], default="all")
    parser.add_argument("--big-layers", type=int, default=22, help="layers of the random Llama (22: ~4.4 GB float32)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="in-memory scoring batch (the score default)")
    parser.add_argument("--stream-batch-sizes", default="8,1", help="streaming batches to measure")
    parser.add_argument("--metrics", default="bi,angular,block-cosine")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    from layerprune.cache import cache_dir
    from layerprune.outputs import write_json_atomic
    from layerprune.reporting.eval_tables import update_doc_section

    work = cache_dir() / "bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    results: dict = {"machine": machine}
    if args.part in ("shards", "all"):
        results["shards"] = bench_shards(work, args.big_layers)
        print(render_shards(results["shards"]))
        if not args.no_doc:
            update_doc_section(DOC, "## Scale", "### Shard surgery", render_shards(results["shards"]) + f" ({machine})")
    if args.part in ("streaming", "all"):
        results["streaming"] = bench_streaming(work, args.rows, args.seq_len, args.batch_size,
                                               [int(b) for b in args.stream_batch_sizes.split(",")], args.metrics)
        print(render_streaming(results["streaming"]))
        if not args.no_doc:
            update_doc_section(DOC, "## Scale", "### Layer-streaming scoring",
                               render_streaming(results["streaming"]) + f" ({machine})")
    write_json_atomic(work / "results.json", results)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        main()
