"""One-GPU check: the CUDA, bfloat16, export, healing (partial-ft, LoRA, QLoRA) and efficiency paths
on both real models, against CPU float32 references, in one command of at most ~8 minutes.

    python benchmarks/gpu_check.py                      # on a CUDA machine: writes docs/benchmarks.md § GPU
    python benchmarks/gpu_check.py --device cpu --quick --doc /tmp/gpu.md   # dry run of every step on CPU

Every step runs through the Python API (``layerprune.load_model``, ``scoring.score``, ``select``,
``prune``, ``save``, ``heal``, ``evaluation``), so a failure here is a failure of what users call.

What is compared, and how closely (``TOLERANCES``):

* **Scores.** ``bi``, ``angular``, ``block-cosine`` (the one-pass metrics) and ``ppl`` on the device in
  bfloat16 and float32 against CPU float32 on the same calibration rows. Error = the largest
  per-layer difference divided by the largest reference value (``ppl`` compared as log-perplexity,
  whose range a removed first layer would otherwise dominate).
* **Selections.** For each metric, the independent and the consecutive 25% selection. float32 must
  pick the very same layers. bfloat16 may break a near-tie the other way: its pick passes when its
  reference importance exceeds the reference pick's by at most the bfloat16 tolerance × scale.
* **Export.** The pruned model (and the partial-ft-healed one) saved with ``layerprune.save`` and
  reloaded with plain transformers gives the in-memory model's logits.
* **Healing.** partial-ft and LoRA (bf16 autocast) and QLoRA (NF4 base; needs bitsandbytes): losses
  finite, the last step's loss below the first's, and perplexity below the pruned model's.
* **Perplexity.** Unpruned model on the device vs CPU float32, same windows.
* **Efficiency** (reported, no bar: on a GPU a small model is bound by kernel launches, not FLOPs):
  prefill and decode tokens/s, measured speed-up of the pruned model vs its FLOP-ideal, batch 1 and 16.

Any mismatch or error makes the exit status 1 (2 when it cannot run at all); skipped steps (QLoRA
without CUDA or bitsandbytes) are reported as skipped, with the reason. Not covered yet: the
training-free repairs, FSDP (see docs/multi-gpu.md) and ``--device-map auto`` over several GPUs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.data.calibration import CalibrationSet
from layerprune.evaluation.efficiency import Workload, measure_efficiency
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.models.loading import LoadedModel
from layerprune.reporting.eval_tables import update_doc_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION, SUBSECTION = "## GPU", "### One-GPU check"
MODELS = ("smollm2-135m", "gemma3-270m")
METRICS = ("bi", "angular", "block-cosine", "ppl")
STRATEGIES = ("independent", "consecutive")
REMOVE = "25%"
DATA = "wiki-sample"
TOLERANCES = {"float32": 1e-3, "bfloat16": 5e-2}
"""Largest per-layer score error / largest reference score. float32 kernels differ from the CPU's only
in summation order (~1e-6); bfloat16 keeps 8 bits of mantissa (~4e-3 per value, more after 30 layers)."""
PPL_TOLERANCES = {"float32": 1e-3, "bfloat16": 3e-2}
"""Relative perplexity error of the unpruned model against CPU float32."""
STATUSES = ("ok", "MISMATCH", "ERROR", "skipped")
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
"""Exported and reloaded vs in-memory logits, relative to the largest logit (same device and dtype)."""


@dataclass(frozen=True)
class Budget:
    """How much work each step does: the full check on a GPU, or a dry run's crumbs on a CPU.

    The full budget is sized (estimated, not yet measured) to fit 8 minutes on a GPU machine with
    16 cores, whose largest part is the CPU float32 reference: ``ppl`` scoring runs the model once
    per layer, and Gemma-3's LM head has 262k rows."""

    samples: int
    seq_len: int
    heal_steps: int
    qlora_steps: int
    heal_batch: int
    heal_seq_len: int
    ppl_seq_len: int
    ppl_windows: int
    prompt_len: int
    new_tokens: int
    repeats: int
    batches: tuple[int, ...] = (1, 16)
    judge_training: bool = True
    """A dry run trains too few steps for its loss to fall reliably: only finiteness is checked then."""


FULL = Budget(samples=8, seq_len=256, heal_steps=50, qlora_steps=20, heal_batch=8, heal_seq_len=256,
              ppl_seq_len=256, ppl_windows=32, prompt_len=128, new_tokens=64, repeats=5)
QUICK = Budget(samples=2, seq_len=32, heal_steps=2, qlora_steps=2, heal_batch=2, heal_seq_len=32,
               ppl_seq_len=64, ppl_windows=2, prompt_len=8, new_tokens=2, repeats=1, judge_training=False)


@dataclass
class Row:
    model: str
    step: str
    setting: str
    value: str
    bar: str
    status: str  # one of STATUSES


@dataclass
class Check:
    """Every result of the run, in order; a step that raises is an ERROR row, and the run goes on."""

    rows: list[Row] = field(default_factory=list)
    efficiency: list[dict[str, object]] = field(default_factory=list)

    def add(self, model: str, step: str, setting: str, value: str, bar: str, passed: bool) -> None:
        self.rows.append(Row(model, step, setting, value, bar, "ok" if passed else "MISMATCH"))
        print(f"[{'ok' if passed else 'MISMATCH'}] {model} {step} {setting}: {value} ({bar})", flush=True)

    def skip(self, model: str, step: str, setting: str, reason: str) -> None:
        self.rows.append(Row(model, step, setting, "—", reason, "skipped"))
        print(f"[skipped] {model} {step} {setting}: {reason}", flush=True)

    @contextmanager
    def step(self, model: str, step: str, setting: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # noqa: BLE001 (one broken path must not hide the others)
            traceback.print_exc()
            message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            self.rows.append(Row(model, step, setting, "—", message, "ERROR"))

    @property
    def failed(self) -> bool:
        return any(row.status in ("MISMATCH", "ERROR") for row in self.rows)


def relative_error(candidate: list[float], reference: list[float], metric: str) -> float:
    """Largest per-layer difference / largest reference value (``ppl`` as log-perplexity)."""
    if metric == "ppl":
        candidate, reference = [math.log(v) for v in candidate], [math.log(v) for v in reference]
    scale = max(abs(v) for v in reference) or 1.0
    return max(abs(c - r) for c, r in zip(candidate, reference, strict=True)) / scale


def equivalent_selection(chosen: list[int], expected: list[int], reference: list[float], metric: str,
                         tolerance: float) -> tuple[bool, str]:
    """Same layers, or (within ``tolerance``) a near-tie: the chosen layers are no more important
    by the reference scores than the expected ones, up to ``tolerance`` × the scores' scale."""
    if chosen == expected:
        return True, f"same layers {expected}"
    values = [math.log(v) for v in reference] if metric == "ppl" else reference
    scale = max(abs(v) for v in values) or 1.0
    excess = (sum(values[i] for i in chosen) - sum(values[i] for i in expected)) / scale
    return excess <= tolerance, f"{chosen} vs {expected} (reference importance +{excess:.2g} × scale)"


def load(alias: str, device: str, dtype: str) -> LoadedModel:
    return lp.load_model(alias, device=device, dtype=dtype)


def check_scores(check: Check, alias: str, device: str, dtype: str, calibration: CalibrationSet,
                 reference: lp.ScoreReport, strict_selection: bool) -> None:
    """Score on the device in ``dtype``; compare scores and selections with the CPU float32 reference."""
    tolerance = TOLERANCES[dtype]
    with check.step(alias, "score", f"{device} {dtype}"):
        loaded = load(alias, device, dtype)
        report = lp.score(loaded, calibration, METRICS, batch_size=4)
        for metric in METRICS:
            error = relative_error(report.results[metric].importance, reference.results[metric].importance, metric)
            check.add(alias, "score", f"{metric}, {device} {dtype}", f"error {error:.2e}", f"<= {tolerance:g}",
                      error <= tolerance)
            for strategy in STRATEGIES:
                chosen = lp.select(report, REMOVE, strategy, metric).remove
                expected = lp.select(reference, REMOVE, strategy, metric).remove
                passed, text = equivalent_selection(chosen, expected, reference.results[metric].importance, metric,
                                                    0.0 if strict_selection else tolerance)
                bar = "the same layers" if strict_selection else f"same, or a tie within {tolerance:g}"
                check.add(alias, "select", f"{metric} {strategy}, {device} {dtype}", text, bar, passed)
        del loaded


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(next(model.parameters()).device)).logits.float()


def check_export(check: Check, alias: str, label: str, loaded: LoadedModel, folder: Path, dtype: str) -> None:
    """``layerprune.save``, reload with plain transformers on the same device and dtype, same logits."""
    with check.step(alias, "export", label):
        lp.save(loaded, folder, overwrite=True)
        device = next(loaded.model.parameters()).device
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        ids = torch.randint(0, loaded.model.get_input_embeddings().num_embeddings, (2, 32),
                            generator=torch.Generator().manual_seed(0))
        expected, got = logits_of(loaded.model, ids), logits_of(reloaded, ids)
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        layers = reloaded.config.num_hidden_layers
        passed = error <= LOGIT_TOLERANCE[dtype] and layers == loaded.num_layers
        check.add(alias, "export", label, f"{layers} layers, logits error {error:.2e}",
                  f"{loaded.num_layers} layers, <= {LOGIT_TOLERANCE[dtype]:g}", passed)
        del reloaded


def perplexity(loaded: LoadedModel, budget: Budget) -> float:
    return dataset_perplexity(loaded.model, loaded.tokenizer, DATA, budget.ppl_seq_len,
                              max_windows=budget.ppl_windows).ppl


def qlora_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "needs CUDA (bitsandbytes 4-bit kernels)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed on this machine"
    return None


def check_healing(check: Check, alias: str, device: str, layers: list[int], pruned_ppl: float, budget: Budget,
                  scratch: Path) -> None:
    """partial-ft and LoRA with bf16 autocast, QLoRA over an NF4 base; the healed partial-ft model is exported."""
    for method, steps in (("partial-ft", budget.heal_steps), ("lora", budget.heal_steps),
                          ("qlora", budget.qlora_steps)):
        setting = f"{steps} steps, {device}, bf16 autocast"
        if method == "qlora" and (reason := qlora_unavailable(device)):
            check.skip(alias, f"heal {method}", setting, reason)
            continue
        with check.step(alias, f"heal {method}", setting):
            pruned = load(alias, device, "float32")
            lp.prune(pruned, layers, reason="gpu check")
            healed = lp.heal(pruned, method, DATA, steps=steps, batch_size=budget.heal_batch,
                             seq_len=budget.heal_seq_len, precision="bfloat16")
            record = healed.lineage["healing"][-1]
            losses = [record["first_loss"], record["final_loss"]]
            finite = all(math.isfinite(v) for v in losses)
            ppl = perplexity(healed, budget)
            if budget.judge_training:
                passed = finite and record["final_loss"] < record["first_loss"] and ppl < pruned_ppl
                bar = "finite, loss falls, ppl below the pruned model's"
            else:
                passed, bar = finite and math.isfinite(ppl), "finite (dry run: too few steps to judge)"
            check.add(alias, f"heal {method}", setting,
                      f"loss {losses[0]:.3f} -> {losses[1]:.3f}, ppl {pruned_ppl:.4g} -> {ppl:.4g}, "
                      f"{record['train_seconds']} s", bar, passed)
            if method == "partial-ft":
                check_export(check, alias, "healed (partial-ft), float32", healed, scratch / f"{alias}-healed",
                             "float32")
            del healed, pruned


def check_efficiency(check: Check, alias: str, device: str, dtype: str, layers: list[int], budget: Budget) -> None:
    """Tokens/s of the unpruned and the pruned model, timed interleaved, at each batch size."""
    with check.step(alias, "efficiency", f"{device} {dtype}"):
        original = load(alias, device, dtype)
        pruned = original.copy()
        lp.prune(pruned, layers, reason="gpu check")
        for batch in budget.batches:
            workload = Workload(prompt_len=budget.prompt_len, new_tokens=budget.new_tokens, repeats=budget.repeats,
                                batch=batch)
            results = measure_efficiency({"original": original.model, "pruned": pruned.model}, workload,
                                         disk=False, memory=False)
            check.efficiency.append({"model": alias, "dtype": dtype, "batch": batch,
                                     "layers": (original.num_layers, pruned.num_layers), **results})
            print(f"[efficiency] {alias} {dtype} batch {batch}: {results['pruned']}", flush=True)
        del original, pruned


def check_model(check: Check, alias: str, device: str, budget: Budget, scratch: Path) -> None:
    """Every step for one model; the CPU float32 run is the reference of the comparisons."""
    reference_model = load(alias, "cpu", "float32")
    calibration = lp.build_calibration(reference_model.tokenizer, DATA, samples=budget.samples,
                                       seq_len=budget.seq_len)
    reference = lp.score(reference_model, calibration, METRICS, batch_size=4)
    reference_ppl = perplexity(reference_model, budget)
    layers = lp.select(reference, REMOVE, "consecutive", "bi").remove
    del reference_model
    for dtype in ("float32", "bfloat16"):
        check_scores(check, alias, device, dtype, calibration, reference, strict_selection=dtype == "float32")
        with check.step(alias, "perplexity", f"unpruned, {device} {dtype}"):
            ppl = perplexity(load(alias, device, dtype), budget)
            error = abs(ppl - reference_ppl) / reference_ppl
            check.add(alias, "perplexity", f"unpruned, {device} {dtype}",
                      f"{ppl:.4g} vs CPU float32 {reference_ppl:.4g} (error {error:.1e})",
                      f"<= {PPL_TOLERANCES[dtype]:g}", error <= PPL_TOLERANCES[dtype])
    pruned_ppl = math.inf
    with check.step(alias, "prune", f"bi consecutive {REMOVE}: layers {layers}"):
        pruned = load(alias, device, "bfloat16")
        lp.prune(pruned, layers, reason="gpu check")
        pruned_ppl = perplexity(pruned, budget)
        check_export(check, alias, f"pruned, {device} bfloat16", pruned, scratch / f"{alias}-pruned", "bfloat16")
        del pruned
    check_healing(check, alias, device, layers, pruned_ppl, budget, scratch)
    for dtype in ("bfloat16", "float32"):
        check_efficiency(check, alias, device, dtype, layers, budget)


def versions() -> str:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    packages = ", ".join(f"{name} {version(name)}" for name in
                         ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "layerprune"))
    return f"{packages}, CUDA {torch.version.cuda or 'none'}, Python {platform.python_version()}"


def device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def _speedup(values: dict[str, float], phase: str) -> str:
    return f"{values[f'{phase}_speedup']:.2f} / {values[f'{phase}_ideal_speedup']:.2f}"


def render(check: Check, device: str, budget: Budget, seconds: float) -> str:
    """The § GPU body: the setting, every check row, the efficiency table."""
    verdict = "**some checks failed**" if check.failed else "**every check passed**"
    lines = [
        (f"`python benchmarks/gpu_check.py` — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {device_name(device)}; "
         f"{versions()}. {seconds / 60:.1f} min in all; {verdict} "
         f"({', '.join(f'{status}: {sum(r.status == status for r in check.rows)}' for status in STATUSES)})."),
        "",
        (f"Calibration: {budget.samples} x {budget.seq_len} tokens of `{DATA}` (train split); pruning removes the "
         f"{REMOVE} consecutive layers of lowest `bi` (CPU float32); healing: {budget.heal_steps} steps (QLoRA "
         f"{budget.qlora_steps}) x {budget.heal_batch} x {budget.heal_seq_len} tokens; perplexity on the first "
         f"{budget.ppl_windows} windows of {budget.ppl_seq_len} tokens of its test split. Tolerances are in the "
         "script's docstring."),
        "",
        "| model | step | setting | result | bar | status |",
        "|---|---|---|---|---|---|",
        *(f"| {r.model} | {r.step} | {r.setting} | {r.value} | {r.bar} | {r.status} |" for r in check.rows),
        "",
        (f"Efficiency (no bar; prompt {budget.prompt_len} tokens, {budget.new_tokens} greedy decode steps, median of "
         f"{budget.repeats} interleaved repeats; tokens/s count every row of the batch; speed-up = pruned / unpruned, "
         "measured / FLOP-ideal):"),
        "",
        "| model | dtype | batch | layers | prefill tok/s | decode tok/s | prefill speed-up | decode speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in check.efficiency:
        original, pruned = entry["original"], entry["pruned"]
        lines.append(
            f"| {entry['model']} | {entry['dtype']} | {entry['batch']} | {entry['layers'][0]} -> {entry['layers'][1]} "
            f"| {original['prefill_tokens_per_s']:,.0f} -> {pruned['prefill_tokens_per_s']:,.0f} "
            f"| {original['decode_tokens_per_s']:,.0f} -> {pruned['decode_tokens_per_s']:,.0f} "
            f"| {_speedup(pruned, 'prefill')} | {_speedup(pruned, 'decode')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda: the check; cpu: a dry run of every step (with --quick, minutes)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: proves the script runs, measures nothing")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated aliases (default: {','.join(MODELS)})")
    parser.add_argument("--doc", type=Path, default=DOC, help="where the § GPU section goes (default: docs/benchmarks.md)")
    parser.add_argument("--healing-budget", metavar="TOKENS,...",
                        help="benchmarks/healing_budget.py's points to run on the device after the checks (training "
                             "tokens; default: its two largest budgets, which the CPU cannot reach; empty: none; "
                             "never with --quick)")
    return parser.parse_args(argv)


def refusal(args: argparse.Namespace) -> str | None:
    """Why this run must not start, in one line, or None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return (f"gpu_check: no CUDA device is visible (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}); run it on a GPU machine, or dry-run it here with "
                "--device cpu --quick --doc /tmp/gpu-check.md")
    if (args.device != "cuda" or args.quick) and args.doc.resolve() == DOC.resolve():
        return ("gpu_check: a CPU or --quick run measures nothing and must not write docs/benchmarks.md; "
                "pass --doc /tmp/gpu-check.md")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (reason := refusal(args)) is not None:
        print(reason, file=sys.stderr)
        return 2
    budget = QUICK if args.quick else FULL
    check = Check()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layerprune-gpu-check-") as scratch:
        for alias in [name.strip() for name in args.models.split(",") if name.strip()]:
            with check.step(alias, "run", "every step"):  # what no step caught: the CPU reference
                check_model(check, alias, args.device, budget, Path(scratch))
    if args.healing_budget != "" and not args.quick:
        import healing_budget  # beside this script: on sys.path when it runs as one

        budgets = args.healing_budget or ",".join(map(str, healing_budget.BUDGETS[2:]))
        with check.step(healing_budget.MODEL, "healing budget", f"{budgets} tokens"):
            # its points are kept in benchmarks/results/healing-budget (bring that folder back with the doc from
            # a lent machine) and its own section (§ Fidelity) rewritten from them; a --doc elsewhere is a trial
            # run, which leaves docs/benchmarks.md as it is
            healing_budget.main(["--device", args.device, "--budgets", budgets,
                                 *([] if args.doc.resolve() == DOC.resolve() else ["--no-doc"])])
    body = render(check, args.device, budget, time.perf_counter() - start)
    update_doc_section(args.doc, SECTION, SUBSECTION, body)
    print(body)
    print(f"\nwritten to {args.doc}; {'FAILED' if check.failed else 'passed'}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
