"""A search's output folder: the winner, ``search.json`` (:mod:`.record`), ``search.md``, ``pareto.png``
(and, for an evolutionary search, ``convergence.png``) and ``recipe.yaml``.

The folder is built under a temporary name and renamed into place at the end
(:func:`layerprune.outputs.atomic_output_dir`), so a failed search leaves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from layerprune.api import save
from layerprune.evaluation.efficiency import TimedSpeedup
from layerprune.models.export import PLACEMENT, ExportConfig
from layerprune.models.loading import LoadedModel
from layerprune.outputs import atomic_output_dir
from layerprune.reporting.figures import png_bytes
from layerprune.searching.candidates import EVOLVED, removed_text

SEARCH_FILE = "search.json"
TABLE_FILE = "search.md"
PLOT_FILE = "pareto.png"
CONVERGENCE_FILE = "convergence.png"
RECIPE_FILE = "recipe.yaml"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the ``(speedup, ppl)`` points no other point beats on both (faster and not worse,
    or as fast and better)."""
    return [i for i, (speed, ppl) in enumerate(points)
            if not any((s >= speed and p < ppl) or (s > speed and p <= ppl) for s, p in points)]


def search_table(record: Any) -> str:
    """``search.md``: one row per candidate tried, the winner marked, best perplexity first."""
    order = sorted(range(len(record.tried)), key=lambda i: (record.tried[i].dropped, record.tried[i].ppl))
    ranking = record.settings["ranking"]
    branches = record.settings["budget"].get("branch_parameters")
    worth = (f"; sub-layer candidates remove {branches:,} parameters of branches (within half a branch)"
             if branches is not None else "")
    lines = [f"# Search: {record.model}, {record.remove} of {record.num_layers} layers removed{worth}", "",
             (f"Ranked on {ranking['source']} ({ranking['split']} split), {ranking['windows']} windows of "
              f"{ranking['seq_len']} tokens; {len(record.tried)} candidates tried in {record.seconds:.0f} s. "
              f"The original (uncut) model scores {ranking['original_ppl']:.2f} on the same windows."), ""]
    evolution = record.settings.get("evolution")
    if evolution:
        best = evolution["best_heuristic_fitness"]
        lines += [(f"Evolution: {evolution['generations_run']} generations of {record.settings['options'].offspring} "
                   f"children (ended by {evolution['stopped_by']}), fitness {evolution['fitness']} on "
                   f"{evolution['fitness_positions']:,} calibration positions, from {evolution['initial_population']} "
                   f"cuts ({evolution['heuristic_cuts']} heuristic"
                   + (f", the best at {best:.4f}" if best is not None else "") + "); the best "
                   f"{len({t.candidate.key for t in record.tried})} by fitness ranked here "
                   "(convergence.png)."), ""]
    if record.shortfall:
        lines += [f"**{record.shortfall[0].upper()}{record.shortfall[1:]}.**", ""]
        lines += [f"- {what}: {why}" for what, why in record.budget_left_out.items()] + [""]
    lines += [("| | candidate | removed | held-out ppl | parameters | decode speed-up (measured / FLOP-ideal) "
               "| seconds |"), "|---|---|---|---|---|---|---|"]
    for index in order:
        tried = record.tried[index]
        mark = "**winner**" if index == record.winner_index else ("dropped" if tried.dropped else "")
        ppl = f"> {tried.ppl:.2f}" if tried.dropped else f"{tried.ppl:.2f}"
        lines.append(f"| {mark} | {tried.label} | {tried.candidate.removed} | {ppl} | "
                     f"{tried.parameters:,} | {speedup_text(tried.speed)} | "
                     f"{tried.seconds:.1f} |")
    notes = sorted({tried.speed.note for tried in record.tried if tried.speed.note})
    if notes:
        lines += ["", "Decode speed-up " + "; ".join(notes) + "."]
    if record.skipped:
        lines += ["", "Repairs that do not apply:", ""]
        lines += [f"- {s['repair']} on {removed_text(s['removed_layers'], s['removed_attention'], s['removed_mlp'])}: "
                  f"{s['reason']}" for s in record.skipped]
    if record.short_of_target:
        target = record.settings["budget"]["target_speedup"]
        lines += ["", f"Sub-layer cuts short of the target decode speed-up of {target:g}x, not ranked:", ""]
        lines += [f"- {candidate.label} ({candidate.removed}): {reason}"
                  for candidate, _, reason in record.short_of_target]
    return "\n".join(lines) + "\n"


def speedup_text(speed: TimedSpeedup) -> str:
    """``measured / FLOP-ideal``, the measured part a dash where timing could not pin it down."""
    measured = "not tight" if speed.measured is None else f"{speed.measured:.2f}x"
    return f"{measured} / {speed.ideal:.2f}x"


def pareto_figure(record: Any) -> Any:
    """Held-out perplexity against decode speed-up, every point labelled, the front joined where it has
    two points or more, the original (uncut) model at 1x as the reference."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = [(t.speed.usable, t.ppl) for t in record.tried]
    ranked = [i for i, t in enumerate(record.tried) if not t.dropped]  # a dropped one's ppl is only a lower bound
    front = sorted((ranked[i] for i in pareto_front([points[i] for i in ranked])), key=lambda i: points[i][0])
    figure, axis = plt.subplots(figsize=(7, 4.5), layout="constrained")
    axis.scatter([1.0], [record.settings["ranking"]["original_ppl"]], marker="s", s=50, color="#2ca02c",
                 label="original (uncut)")
    for index, (tried, (speed, ppl)) in enumerate(zip(record.tried, points, strict=True)):
        winner = index == record.winner_index
        axis.scatter([speed], [ppl], marker="*" if winner else "o", s=140 if winner else 30,
                     facecolors="none" if tried.dropped else ("#d62728" if winner else "#1f77b4"),
                     edgecolors="#d62728" if winner else "#1f77b4", label="winner" if winner else None)
        axis.annotate(tried.label, (speed, ppl), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if len(front) > 1:  # a front of one point is no line: no legend entry for what is not drawn
        axis.plot([points[i][0] for i in front], [points[i][1] for i in front], color="#7f7f7f", linewidth=0.8,
                  label="Pareto front")
    axis.set_xlabel("decode speed-up over the original (measured; FLOP-ideal where timing was not tight)"
                    if any(t.speed.measured is None for t in record.tried) else
                    "measured decode speed-up over the original")
    axis.set_ylabel("held-out perplexity (hollow: dropped early, a lower bound)")
    title = f"{record.model}: {len(record.tried)} candidate{'s' if len(record.tried) != 1 else ''}"
    axis.set_title(title + (f"\n{record.shortfall}" if record.shortfall else ""), fontsize=9,
                   color="#d62728" if record.shortfall else "black")
    axis.legend(fontsize=7)
    return figure


def plot_pareto(record: Any) -> bytes:
    """:func:`pareto_figure` as PNG bytes."""
    return png_bytes(pareto_figure(record), dpi=110)


def plot_convergence(record: Any) -> bytes:
    """PNG: an evolutionary search's best fitness after each generation against the tokens forwarded so
    far, the best heuristic selection's fitness as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    evolution = record.settings["evolution"]
    trace = evolution["trace"]
    tokens = [sum(g["tokens"] for g in trace[:i + 1]) for i in range(len(trace))]
    figure, axis = plt.subplots(figsize=(7, 4.5), layout="constrained")
    axis.step(tokens, [g["best_fitness"] for g in trace], where="post", color="#1f77b4", label="evolution: best so far")
    axis.scatter(tokens, [g["best_fitness"] for g in trace], s=10, color="#1f77b4")
    if evolution["best_heuristic_fitness"] is not None:
        axis.axhline(evolution["best_heuristic_fitness"], color="#d62728", linestyle="--", linewidth=0.8,
                     label="best heuristic selection")
    axis.set_xlabel("tokens forwarded (the initial population first, then each generation)")
    axis.set_ylabel(f"fitness: {evolution['fitness']} on {evolution['fitness_positions']:,} positions (lower is better)")
    axis.set_title(f"{record.model}: {evolution['generations_run']} generations, ended by {evolution['stopped_by']}",
                   fontsize=9)
    axis.legend(fontsize=7)
    return png_bytes(figure, dpi=110)


def recipe_document(record: Any, source: str, calibration: dict[str, Any], batch_size: int,
                    metric_options: dict[str, Any], heal_options: dict[str, Any], export: ExportConfig) -> dict[str, Any]:
    """The recipe that replays the winner without searching: its metric alone and its strategy (or,
    for a cut an evolutionary search found or one of branches, its layers and branches), its repair,
    and how it was written where that is not the default."""
    winner = record.winner.candidate
    document: dict[str, Any] = {
        "name": f"search winner: {winner.label}",
        "description": f"replays the winner of layerprune search ({record.remove} of {record.num_layers} layers"
                       + ("' parameters, as branches" if winner.removes_branches else "") + ")",
        "model": source,
        "calibration": calibration,
    }
    if winner.strategy == EVOLVED or winner.granularity == "sublayer":
        # no metric chose it, or the recipe's score stage scores whole layers: the recipe names the cut
        named = {"layers": winner.remove, "attention": winner.attention, "mlp": winner.mlp}
        document["select"] = {key: list(indices) for key, indices in named.items() if indices}
    else:
        document["score"] = {"metrics": [winner.metric], "batch_size": batch_size, **metric_options}
        document["select"] = {"remove": record.remove, "strategy": winner.strategy, "metric": winner.metric}
    if winner.repair is not None:
        document["repair"] = {"method": winner.repair, "batch_size": batch_size}
    if record.settings.get("heal"):
        document["heal"] = {"method": record.settings["heal"], "data": calibration["source"], **heal_options}
    written = export.model_dump(exclude=set(PLACEMENT), exclude_defaults=True)
    if written:
        document["export"] = written
    return document


def write_search(record: Any, winner: LoadedModel, out: str | Path, *, overwrite: bool, protected: Iterable[Path],
                 source: str, calibration: dict[str, Any], batch_size: int, metric_options: dict[str, Any],
                 heal_options: dict[str, Any], export: ExportConfig) -> Path:
    """Write the whole output folder atomically, the winner as ``export`` says; returns it."""

    recipe = recipe_document(record, source, calibration, batch_size, metric_options, heal_options, export)
    recipe_text = yaml.safe_dump(recipe, sort_keys=False)
    document = record.to_json()  # checked against its model before anything is written
    with atomic_output_dir(out, overwrite=overwrite, protected=protected) as staging:
        save(winner, staging / "model", recipe={"file": RECIPE_FILE, "text": recipe_text, "model": source,
                                                 "search": record.winner.to_json()}, **export.written())
        (staging / SEARCH_FILE).write_text(json.dumps(document, indent=2) + "\n")
        (staging / TABLE_FILE).write_text(search_table(record))
        (staging / PLOT_FILE).write_bytes(plot_pareto(record))
        if record.settings.get("evolution"):
            (staging / CONVERGENCE_FILE).write_bytes(plot_convergence(record))
        (staging / RECIPE_FILE).write_text(recipe_text)
    return Path(out).expanduser().resolve()
