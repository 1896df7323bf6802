"""Sub-layer benchmark (issue 30): the best whole-layer cut against the best sub-layer cut (attention and
MLP branches), each plain and with the best training-free repair, at 12%, 25% and 37% of the decoder
(docs/benchmarks.md § Sub-layers).

    nice -n 19 python benchmarks/sublayers.py --skip-timing          # smollm2-135m at 25%, no timing
    python benchmarks/sublayers.py --models gemma3-270m --budgets 12%,25%,37% --minutes 30
    python benchmarks/sublayers.py --models smollm2-135m,gemma3-270m --budgets 12%,25%,37%  # + timing, quiet machine
    python benchmarks/sublayers.py --render                         # only rewrite the docs section

Per model and budget, each step saved as JSON once done, under
``$LAYERPRUNE_CACHE/bench-sublayers/<model>/<budget>-<samples>rows-<minutes>min/`` (a run cut off resumes at the step it
was in; ``--render`` writes the docs from what is there, each budget from its longest saved search):

1. ``search``: one ``lp.search(granularity="both", remove=B, time_budget=M, algorithm="heuristic")`` with its
   repairs (on ``--samples`` calibration rows: with the default 64, scoring SmolLM2's layers alone took 13 minutes
   of a 20-minute budget on the shared 2-core CPU, load 5-7, too few to rank any branch cut), so the
   whole-layer and the branch candidates (at the parameters of the same number of whole layers) are
   ranked on the same held-out (validation) windows; from what it tried, per kind of cut (one that
   removes a lone attention or MLP is a sub-layer cut, any other a whole-layer cut) the best plain
   cut and the best repaired one by that ranking;
2. ``test``: each chosen cut rebuilt by the search's own :func:`cut` and read on text neither the
   calibration (train) nor the ranking (validation) read: wiki-sample test perplexity (16 windows of
   256 tokens, 95% bootstrap interval) and the ``lp_offline`` suite (``--task-limit`` examples per
   task), retained performance (RP) against the original with its paired-bootstrap 95% interval;
3. ``structure``, once per distinct cut (a repair changes weights, not structure): KV-cache bytes per
   token, the FLOP-ideal decode speed-up at 256 and 2,048 tokens of context, and the layer count of
   each export form (``transformers``: kept branches repacked into standard layers, with the zero
   partners that needs; ``decilm`` and ``gguf``, or why the form cannot hold the cut);
4. ``timing`` (left out with ``--skip-timing``; the one step that must not share the CPU): the
   measured decode speed-up at both contexts, timed in turns against the original in this process.

The original's test reading and FLOP counts are steps of the model, shared by its budgets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_cuts import (
    FORMS,
    KINDS,
    NOT_RUN,
    Rebuilder,
    candidate_of,
    choose,
    costed,
    cut_kind,
    environment,
    interval_text,
    load_average,
    task_reading,
)

import layerprune as lp
from layerprune.cache import cache_dir
from layerprune.data.calibration import CalibrationConfig
from layerprune.errors import UsageError
from layerprune.evaluation.efficiency import (
    Workload,
    decode_speedup_in_turns,
    flops_per_token,
    kv_cache_bytes_per_token,
)
from layerprune.evaluation.intervals import retained_difference, retained_performance
from layerprune.evaluation.perplexity import dataset_perplexity
from layerprune.models.decilm import decilm_refusal
from layerprune.models.gguf_export import check_deci_layers
from layerprune.models.gguf_file import architecture_of
from layerprune.models.lineage import count_parameters
from layerprune.models.sublayers import present_branches, repack_plan
from layerprune.outputs import write_json_atomic
from layerprune.reporting.eval_tables import update_doc_section
from layerprune.searching.candidates import cut, removed_text
from layerprune.searching.config import SearchConfig

MODELS = ("smollm2-135m", "gemma3-270m")
BUDGETS = ("12%", "25%", "37%")
CONTEXTS = (256, 2048)
NEW_TOKENS = 16
EVAL_WINDOW, EVAL_WINDOWS = 256, 16
ROOT = cache_dir() / "bench-sublayers"
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def step(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The step saved at ``path``, or ``compute``'s result saved there with its cost: wall-clock
    seconds, the 1-minute load average before it, and when it ran."""
    if path.exists():
        return json.loads(path.read_text())
    result = costed(compute)
    write_json_atomic(path, result, overwrite=True)
    print(f"{path.relative_to(ROOT)}: {result['seconds']} s (load {result['load_before']})", flush=True)
    return result


def cached(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def budget_dir(model: str, budget: str, samples: int, minutes: float) -> Path:
    """A budget's steps, apart for each calibration size and search time budget (what the search scores,
    repairs and reaches depends on both: a rerun with more minutes searches again)."""
    return ROOT / model / f"{budget.replace('%', 'pct')}-{samples}rows-{minutes:g}min"


def longest_search(model: str, budget: str, samples: int) -> Path | None:
    """The budget's saved cell with the longest search (the docs show one cell a budget; a model that
    costs more per forward, or a session short of CPU, may have searched for a different time)."""
    saved = [where for where in (ROOT / model).glob(f"{budget.replace('%', 'pct')}-{samples}rows-*min")
             if (where / "search.json").exists()]
    return max(saved, key=lambda where: float(where.name.rsplit("-", 1)[1].removesuffix("min")), default=None)


def chosen_from(found: dict[str, Any]) -> dict[str, Any]:
    """A saved search step with its cuts chosen again from what it tried (:func:`choose` as it is now, so a
    search saved under an earlier rule needs no new search)."""
    return {**found, "chosen": choose(found["tried"])}


def search_step(original: lp.LoadedModel, budget: str, minutes: float,
                calibration: CalibrationConfig) -> dict[str, Any]:
    """One search of both granularities, what it tried and left out, and the cuts chosen from it."""
    record = lp.search(original, remove=budget, granularity="both", time_budget=minutes, calibration=calibration,
                       algorithm="heuristic", progress=False)
    tried = [t.to_json() for t in record.tried]
    decoder = sum(count_parameters(layer) for layer in original.adapter.decoder_layers(original.model))
    return {"minutes": minutes, "samples": calibration.samples, "num_layers": record.num_layers,
            "remove": record.remove,
            "branch_parameters": record.settings["budget"]["branch_parameters"],
            "parameters": count_parameters(original.model), "decoder_parameters": decoder,
            "original_ppl": record.settings["ranking"]["original_ppl"], "seconds_inside": round(record.seconds, 1),
            "shortfall": record.shortfall, "tried": tried, "chosen": choose(tried),
            "skipped_repairs": [{"kind": cut_kind(s), "repair": s["repair"], "reason": s["reason"]}
                                for s in record.skipped],
            "not_tried": [{"kind": cut_kind(c.to_json()), "label": c.label, "reason": reason}
                          for c, reason in record.not_tried]}


def structure_key(record: dict[str, Any]) -> str:
    """What a cut removes, as text: plain and repaired cuts of one structure share it."""
    return removed_text(record["removed_layers"], record["removed_attention"], record["removed_mlp"])


def read(loaded: lp.LoadedModel, task_limit: int) -> dict[str, Any]:
    """Test-split perplexity and the offline suite's per-example correctness (for paired intervals)."""
    with torch.inference_mode():
        ppl = dataset_perplexity(loaded.model, loaded.tokenizer, "wiki-sample", EVAL_WINDOW, max_windows=EVAL_WINDOWS)
    return {"ppl": ppl.ppl, "ppl_ci95": list(ppl.ci95), "ppl_tokens": ppl.tokens, **task_reading(loaded, task_limit)}


def read_cut(rebuild: Rebuilder, record: dict[str, Any], reference: dict[str, Any], task_limit: int) -> dict[str, Any]:
    """One chosen cut rebuilt and read on the test text, its RP against the original's reading."""
    got = read(rebuild(record), task_limit)
    return {**got, "retained": retained_performance(reference["correct"], got["correct"])}


def read_path(where: Path, task_limit: int, slot: str) -> Path:
    """Where a chosen cut's test reading is saved (each cut its own step, so a cut-off run resumes)."""
    return where / f"test-{task_limit}" / f"{slot.replace(', ', '-').replace(' ', '-')}.json"


def saved_reads(where: Path, task_limit: int, chosen: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The test readings of the chosen cuts done so far."""
    return {slot: got for slot in chosen if (got := cached(read_path(where, task_limit, slot))) is not None}


def export_layers(loaded: lp.LoadedModel) -> dict[str, Any]:
    """The layer count of each export form, or why the form cannot hold the cut (nothing is written)."""
    present = present_branches(loaded.model, loaded.adapter)
    plan = repack_plan(present, loaded.adapter.parallel_residual)
    config = loaded.model.config
    branch_cut = not all(all(branches) for branches in present)
    gguf: int | str = len(present)
    try:
        if branch_cut:  # llama.cpp's deci, as save_gguf writes a branch cut
            reason = decilm_refusal(config, ffn_mult=False)
            if reason is not None:
                raise UsageError(reason)
            check_deci_layers(present)
        else:
            architecture_of(config.model_type)
    except UsageError as refusal:
        gguf = f"n/a: {refusal}"
    deci = decilm_refusal(config)
    return {"transformers": len(plan), "zero_partners": sum(branch is None for pair in plan for branch in pair),
            "decilm": len(present) if deci is None else f"n/a: {deci}", "gguf": gguf}


def workload(context: int) -> Workload:
    return Workload(prompt_len=context, new_tokens=NEW_TOKENS, repeats=3)


def original_flops_step(original: lp.LoadedModel) -> dict[str, Any]:
    """The original's decode FLOPs per token at each context (what every FLOP-ideal speed-up divides)."""
    return {"decode_flops": {str(c): flops_per_token(original.model, workload(c))[1] for c in CONTEXTS},
            "kv_bytes": {str(c): kv_cache_bytes_per_token(original.model, c) for c in CONTEXTS},
            "layers": export_layers(original)}


def distinct_structures(chosen: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One plain record per distinct structure among the chosen cuts (a repair does not change it)."""
    return {structure_key(record): {**record, "repair": None} for record in chosen.values()}


def structure_step(original: lp.LoadedModel, chosen: dict[str, dict[str, Any]],
                   reference: dict[str, Any]) -> dict[str, Any]:
    figures = {}
    for key, record in distinct_structures(chosen).items():
        pruned = cut(original, candidate_of(record), None, SearchConfig().batch_size)
        figures[key] = {"kv_bytes": {str(c): kv_cache_bytes_per_token(pruned.model, c) for c in CONTEXTS},
                        "flop_ideal": {str(c): reference["decode_flops"][str(c)]
                                       / flops_per_token(pruned.model, workload(c))[1] for c in CONTEXTS},
                        "layers": export_layers(pruned)}
    return {"structures": figures}


def timing_step(original: lp.LoadedModel, chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each structure's decode timed in turns against the original, at each context, the load before each."""
    figures: dict[str, dict[str, Any]] = {}
    for key, record in distinct_structures(chosen).items():
        pruned = cut(original, candidate_of(record), None, SearchConfig().batch_size)
        for context in CONTEXTS:
            load = load_average()
            speed = decode_speedup_in_turns(original.model, pruned.model, workload(context))
            figures.setdefault(key, {})[str(context)] = {
                "measured": speed.measured, "interval": speed.interval, "turns": speed.turns, "ideal": speed.ideal,
                "note": speed.note, "load_before": load}
    return {"structures": figures, "torch_threads": torch.get_num_threads()}


def bench(model: str, budgets: list[str], minutes: float, samples: int, task_limit: int, timing: bool) -> None:
    """The steps of ``model`` at ``budgets`` not saved yet."""
    calibration = CalibrationConfig(samples=samples)
    original = lp.load_model(model)
    folder = ROOT / model
    reference = step(folder / f"original-test-{task_limit}.json", lambda: read(original, task_limit))
    step(folder / "environment.json", environment)
    for budget in budgets:
        where = budget_dir(model, budget, samples, minutes)
        found = chosen_from(step(where / "search.json", partial(search_step, original, budget, minutes, calibration)))
        rebuild = Rebuilder(original, calibration)
        for slot, record in found["chosen"].items():
            step(read_path(where, task_limit, slot), partial(read_cut, rebuild, record, reference, task_limit))
        flops = step(folder / "original-structure.json", partial(original_flops_step, original))
        step(where / "structure.json", partial(structure_step, original, found["chosen"], flops))
        if timing:
            step(where / "timing.json", partial(timing_step, original, found["chosen"]))


# --- the docs section, from what is saved ---

def removed_share(record: dict[str, Any], found: dict[str, Any]) -> str:
    """The share of the decoder's parameters a cut removed (what the budget is counted in)."""
    return f"{(found['parameters'] - record['parameters']) / found['decoder_parameters']:.1%}"


def missing_note(kind: str, form: str, found: dict[str, Any]) -> str:
    """Why no cut of ``kind`` in ``form`` was read: candidates the search left unranked (its time budget),
    else for a repaired one its refusal of the repairs for such a cut."""
    unranked = [n["reason"] for n in found["not_tried"]
                if n["kind"] == kind and ("+" in n["label"]) == (form == "repaired")]
    refused = next((s["reason"] for s in found["skipped_repairs"] if s["kind"] == kind), None)
    what = "no repair applied" if form == "repaired" else "no cut ranked"
    if unranked:
        return f"{what} ({len(unranked)} candidates unranked: {unranked[0]})"
    return f"{what} (the search: {refused})" if refused and form == "repaired" else what


def quality_table(found: dict[str, Any], tests: dict[str, Any] | None, reference: dict[str, Any]) -> list[str]:
    lines = [("| cut | found by | removed | decoder parameters removed | ranking ppl (validation) | test ppl [95%] "
              "| RP [95%] |"), "|---|---|---|---|---|---|---|",
             (f"| original | | | 0 | {found['original_ppl']:.2f} "
              f"| {interval_text(reference['ppl'], reference['ppl_ci95'], '{:.2f}')} | 1 |")]
    for kind in KINDS:
        for form in FORMS:
            slot = f"{kind}, {form}"
            record = found["chosen"].get(slot)
            if record is None:
                lines.append(f"| {slot} | {missing_note(kind, form, found)} | | | | | |")
                continue
            got = (tests or {}).get("reads", {}).get(slot)
            finder = f"{record['metric']}/{record['strategy']}" + (f" + {record['repair']}" if record["repair"] else "")
            if record["dropped_early"]:
                finder += " (dropped early by the search: its ranking ppl is a running value)"
            lines.append(
                f"| {slot} | {finder} | {structure_key(record)} | {removed_share(record, found)} "
                f"| {record['held_out_ppl']:.2f} "
                f"| {interval_text(got['ppl'], got['ppl_ci95'], '{:.2f}') if got else NOT_RUN} "
                f"| {interval_text(got['retained']['mean'], got['retained']['ci95'], '{:.3f}') if got else NOT_RUN} |")
    return lines


def layers_text(layers: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        return str(value) if isinstance(value, int) else "n/a"
    partners = f" ({layers['zero_partners']} zero partners)" if layers["zero_partners"] else ""
    return f"{layers['transformers']}{partners} / {one(layers['decilm'])} / {one(layers['gguf'])}"


def per_context(values: dict[str, float], pattern: str) -> str:
    return " / ".join(pattern.format(values[str(c)]) for c in CONTEXTS)


def structure_table(found: dict[str, Any], shape: dict[str, Any] | None, timing: dict[str, Any] | None,
                    original: dict[str, Any] | None) -> list[str]:
    contexts = " / ".join(f"{c:,}" for c in CONTEXTS)
    lines = [(f"| structure | KV cache bytes per token at {contexts} | FLOP-ideal decode speed-up at {contexts} "
              f"| measured decode speed-up at {contexts} | layers: transformers / decilm / gguf |"),
             "|---|---|---|---|---|"]
    if original is not None:
        lines.append(f"| original | {per_context(original['kv_bytes'], '{:,.0f}')} | 1 | 1 "
                     f"| {layers_text(original['layers'])} |")
    for key in distinct_structures(found["chosen"]):
        figures = (shape or {}).get("structures", {}).get(key)
        timed = (timing or {}).get("structures", {}).get(key)
        measured = NOT_RUN if timed is None else " / ".join(
            interval_text(timed[str(c)]["measured"], timed[str(c)]["interval"], "{:.2f}")
            if timed[str(c)]["measured"] else "too noisy" for c in CONTEXTS)
        if figures is None:
            lines.append(f"| {key} | {NOT_RUN} | {NOT_RUN} | {measured} | {NOT_RUN} |")
            continue
        lines.append(f"| {key} | {per_context(figures['kv_bytes'], '{:,.0f}')} "
                     f"| {per_context(figures['flop_ideal'], '{:.2f}')} | {measured} "
                     f"| {layers_text(figures['layers'])} |")
    return lines


def best(found: dict[str, Any], tests: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]] | None:
    """The slot of ``kind`` with the lowest test perplexity among those read."""
    reads = [(slot, got) for slot, got in tests["reads"].items() if slot.startswith(kind)]
    return min(reads, key=lambda pair: pair[1]["ppl"]) if reads else None


def reading(model: str, budget: str, found: dict[str, Any], tests: dict[str, Any] | None,
            reference: dict[str, Any], shape: dict[str, Any] | None, timing: dict[str, Any] | None) -> str:
    """One plain sentence per cell from the measured numbers only: which kind of cut is better, on what."""
    if tests is None:
        return f"{model} at {budget}: test reading not run."
    whole, branch = best(found, tests, KINDS[0]), best(found, tests, KINDS[1])
    if whole is None or branch is None:
        return (f"{model} at {budget}: not compared, the search ranked no {KINDS[1] if branch is None else KINDS[0]} "
                "cut within its time budget.")
    (whole_slot, w), (branch_slot, b) = whole, branch
    better = "sub-layers win" if b["ppl"] < w["ppl"] else "whole layers win"
    rp = retained_difference(reference["correct"], b["correct"], w["correct"])
    rp_says = ("the same within the interval" if rp["ci95"][0] <= 0 <= rp["ci95"][1]
               else "higher for sub-layers" if rp["mean"] > 0 else "higher for whole layers")
    parts = [(f"{model} at {budget}: on test perplexity {better} ({branch_slot} {b['ppl']:.2f} against "
              f"{whole_slot} {w['ppl']:.2f}); RP sub-layer minus whole-layer "
              f"{interval_text(rp['mean'], rp['ci95'], '{:+.3f}')}, {rp_says}")]
    figures = (shape or {}).get("structures", {})
    keys = [structure_key(found["chosen"][slot]) for slot in (branch_slot, whole_slot)]
    if all(key in figures for key in keys):
        kv = [figures[key]["kv_bytes"][str(CONTEXTS[-1])] for key in keys]
        ideal = [figures[key]["flop_ideal"][str(CONTEXTS[-1])] for key in keys]
        parts.append(f"at {CONTEXTS[-1]:,} tokens the sub-layer cut caches {kv[0]:,.0f} bytes per token against "
                     f"{kv[1]:,.0f} and its FLOP-ideal decode speed-up is {ideal[0]:.2f}x against {ideal[1]:.2f}x")
    timed = (timing or {}).get("structures", {})
    if all(key in timed and timed[key][str(CONTEXTS[-1])]["measured"] for key in keys):
        speeds = [timed[key][str(CONTEXTS[-1])]["measured"] for key in keys]
        parts.append(f"measured {speeds[0]:.2f}x against {speeds[1]:.2f}x")
    else:
        parts.append("measured speed-up not run" if timing is None else "measured speed-up too noisy to compare")
    return "; ".join(parts) + "."


def costs(where: Path, found: dict[str, Any], reads: dict[str, dict[str, Any]]) -> str:
    """Each step's wall-clock seconds and the load before it (the test reading summed over the cuts read)."""
    done = {name: cached(where / file) for name, file in (("structure", "structure.json"), ("timing", "timing.json"))}
    parts = [f"search {found['seconds']:.0f} s (load before {found['load_before']})",
             f"test reading {sum(got['seconds'] for got in reads.values()):.0f} s for {len(reads)} of "
             f"{len(found['chosen'])} cuts (load before {', '.join(str(got['load_before']) for got in reads.values())})"
             if reads else f"test reading {NOT_RUN}"]
    parts += [f"{name} {got['seconds']:.0f} s (load before {got['load_before']})" if got else f"{name} {NOT_RUN}"
              for name, got in done.items()]
    return "; ".join(parts)


def render(models: list[str], budgets: list[str], samples: int, task_limit: int) -> str:
    lines = [
        ("Per model and budget, one `lp.search(granularity=\"both\", remove=B, time_budget=M, "
         "algorithm=\"heuristic\")` with its "
         f"training-free repairs, scoring and repairing on {samples} wiki-sample calibration rows of 256 tokens, "
         "ranks whole-layer and branch candidates (the latter at the decoder parameters "
         "of the same number of whole layers) on the same held-out validation windows. From what it tried, "
         "per kind of cut (a cut that removes a lone attention or MLP is a sub-layer cut) the best plain and the "
         "best repaired cut by that ranking are rebuilt and read on the wiki-sample *test* split "
         f"({EVAL_WINDOWS} windows of {EVAL_WINDOW} tokens, 95% bootstrap interval) and the `lp_offline` suite "
         f"({task_limit} examples per task; RP = retained performance against the original, paired-bootstrap "
         "95% interval). Per structure: KV cache per token (float32, `kv_cache_bytes_per_token`: a layer without "
         "attention caches nothing, a sliding-window layer only its window), FLOP-ideal and measured decode "
         "speed-up (16 greedy steps after a "
         "prompt of the context, timed in turns against the original), and the layers of each export form "
         "(transformers: kept branches repacked into standard layers, zero partners where a branch has none; "
         "decilm and gguf keep every layer, n/a where the form cannot hold the model). "
         "Produced by `python benchmarks/sublayers.py`; cells not yet run say so."), ""]
    cells = []
    for model in models:
        env = cached(ROOT / model / "environment.json")
        reference = cached(ROOT / model / f"original-test-{task_limit}.json")
        original = cached(ROOT / model / "original-structure.json")
        if env is None or reference is None:
            lines += [f"#### {model}", "", NOT_RUN + ".", ""]
            continue
        lines += [f"#### {model}", "", (f"{env['machine']}; {env['versions']}; original read {reference['date']} "
                                        f"UTC in {reference['seconds']:.0f} s (load before "
                                        f"{reference['load_before']})."), ""]
        for budget in budgets:
            where = longest_search(model, budget, samples)
            if where is None:
                lines += [f"**{budget}**: {NOT_RUN}.", ""]
                continue
            found = chosen_from(cached(where / "search.json"))
            reads = saved_reads(where, task_limit, found["chosen"])
            tests = {"reads": reads} if reads else None
            shape, timing = cached(where / "structure.json"), cached(where / "timing.json")
            lines += [(f"**{budget}** ({found['remove']} of {found['num_layers']} layers, or their "
                       f"{found['branch_parameters']:,} parameters in branches; search {found['minutes']:g} min, "
                       f"candidates ranked: {len(found['tried'])}"
                       + (f"; {found['shortfall']}" if found["shortfall"] else "") + "). Cost: "
                       + costs(where, found, reads) + "."), "",
                      *quality_table(found, tests, reference), "",
                      *structure_table(found, shape, timing, original), ""]
            if timing is not None:
                loads = sorted({t[str(c)]["load_before"] for t in timing["structures"].values() for c in CONTEXTS})
                lines += [(f"Timing: {timing['torch_threads']} torch threads, 1-minute load before each timing "
                           f"{loads[0]}-{loads[-1]}."), ""]
            cells.append(reading(model, budget, found, tests, reference, shape, timing))
    lines += ["Where sub-layers win and where they do not (from the measured numbers above):", "",
              *[f"- {cell}" for cell in cells or ["nothing measured yet"]]]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--models", default=MODELS[0], help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--budgets", default="25%", help="comma-separated, of " + ", ".join(BUDGETS).replace("%", "%%"))
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="each search's time budget (both granularities' scoring, then ranking)")
    parser.add_argument("--samples", type=int, default=16,
                        help="calibration rows the search scores and repairs on (the study's 16; the default 64 "
                             "costs 4x the scoring)")
    parser.add_argument("--task-limit", type=int, default=40, help="lp_offline examples per task")
    parser.add_argument("--skip-timing", action="store_true", help="leave the measured decode speed-up out")
    parser.add_argument("--render", action="store_true", help="only rewrite the docs section from the cache")
    args = parser.parse_args(argv)
    if not args.render:
        for model in args.models.split(","):
            bench(model, args.budgets.split(","), args.minutes, args.samples, args.task_limit, not args.skip_timing)
    update_doc_section(DOC, "## Sub-layers", "### Whole layers against attention and MLP branches",
                       render(list(MODELS), list(BUDGETS), args.samples, args.task_limit))
    print(f"wrote the Sub-layers section of {DOC}")


if __name__ == "__main__":
    sys.exit(main())
