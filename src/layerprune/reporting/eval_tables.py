"""Evaluation results as people read them: Markdown tables with Δ columns, and PNG plots.

A comparison puts the reference model (usually the original) first and every other model beside
it with its difference, so "what did pruning cost" is one glance: perplexity, accuracy, stability,
retained performance and efficiency in one table. Perplexity, accuracy and retained performance
carry their 95% intervals (in the table as "value (low–high)", in the plot as error bars), so a
difference smaller than the noise reads as such.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerprune.evaluation.record import checked_report
from layerprune.outputs import MARKDOWN_MARK, write_bytes_atomic, write_json_atomic
from layerprune.reporting.figures import png_bytes

_EFFICIENCY_ROWS: tuple[tuple[str, str, Callable[[float], float]], ...] = (
    ("disk_bytes", "size on disk (MB)", lambda v: v / 1e6),
    ("peak_memory_bytes", "peak memory (MB)", lambda v: v / 1e6),
    ("kv_cache_bytes_per_token", "KV cache per token (bytes)", float),
    ("kv_cache_ratio", "KV cache vs reference", float),
    ("prefill_tokens_per_s", "prefill tokens/s", float),
    ("decode_tokens_per_s", "decode tokens/s", float),
    ("prefill_speedup", "prefill speed-up", float),
    ("prefill_ideal_speedup", "prefill speed-up, FLOP ideal", float),
    ("decode_speedup", "decode speed-up", float),
    ("decode_ideal_speedup", "decode speed-up, FLOP ideal", float),
)


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """One model's evaluation as ordered ``row label -> number`` pairs for tables and plots."""
    rows: dict[str, float] = {}
    for key in ("num_layers", "parameters"):
        if key in result:
            rows[key.replace("num_", "")] = float(result[key])
    for data, values in result.get("perplexity", {}).items():
        rows[f"ppl {data}"] = values["ppl"]
    for task, values in result.get("tasks", {}).items():
        for metric in ("acc", "acc_norm"):
            if metric in values:
                rows[f"{task} {metric}"] = values[metric]
    for task, value in result.get("stability", {}).items():
        rows[f"{task} stability"] = value
    if "retained" in result:
        rows["retained"] = result["retained"]["mean"]
    if (result.get("retained_above_chance") or {}).get("mean") is not None:
        rows["retained above chance"] = result["retained_above_chance"]["mean"]
    for data, values in result.get("fidelity", {}).items():
        rows[f"KL to original {data}"] = values["kl"]
        rows[f"top-1 agreement {data}"] = values["top1_agreement"]
    if "generation" in result:
        rows["generation: tokens before divergence"] = result["generation"]["mean_agreed_tokens"]
        rows["generation: identical"] = result["generation"]["identical"]
    efficiency = result.get("efficiency", {})
    for key, label, scale in _EFFICIENCY_ROWS:
        if efficiency.get(key) is not None:  # the ratio is null where the reference caches nothing
            rows[label] = scale(efficiency[key])
    return rows


def metric_intervals(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """95% intervals of ``flatten_metrics``'s rows that have one: perplexity, retained performance (plain
    and above chance) and fidelity (bootstrap, stored), and accuracy (acc ± 1.96 standard errors, within
    [0, 1])."""
    intervals: dict[str, tuple[float, float]] = {}
    for data, values in result.get("perplexity", {}).items():
        if "ci95" in values:
            intervals[f"ppl {data}"] = (values["ci95"][0], values["ci95"][1])
    for task, values in result.get("tasks", {}).items():
        if "acc" in values and math.isfinite(values.get("stderr", math.nan)):
            margin = 1.96 * values["stderr"]
            intervals[f"{task} acc"] = (max(0.0, values["acc"] - margin), min(1.0, values["acc"] + margin))
    if "retained" in result:
        low, high = result["retained"]["ci95"]
        intervals["retained"] = (low, high)
    if (result.get("retained_above_chance") or {}).get("ci95") is not None:
        low, high = result["retained_above_chance"]["ci95"]
        intervals["retained above chance"] = (low, high)
    for data, values in result.get("fidelity", {}).items():
        intervals[f"KL to original {data}"] = (values["kl_ci95"][0], values["kl_ci95"][1])
        intervals[f"top-1 agreement {data}"] = (values["top1_agreement_ci95"][0], values["top1_agreement_ci95"][1])
    return intervals


def _format(value: float | None) -> str:
    if value is None:
        return "—"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def _delta(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return "—"
    difference = value - reference
    return ("+" if difference > 0 else "") + _format(difference) if difference else "0"


def comparison_table(report: dict[str, Any]) -> str:
    """Markdown: one row per metric, the reference model first, then each model and its Δ."""
    names = list(report["models"])
    reference = report.get("reference", names[0])
    others = [name for name in names if name != reference]
    flat = {name: flatten_metrics(report["models"][name]) for name in names}
    intervals = {name: metric_intervals(report["models"][name]) for name in names}
    labels = list(dict.fromkeys(label for name in [reference, *others] for label in flat[name]))
    header = ["metric", reference] + [column for name in others for column in (name, f"Δ {name}")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(name: str, label: str) -> str:
        interval = intervals[name].get(label)
        value = _format(flat[name].get(label))
        return f"{value} ({_format(interval[0])}–{_format(interval[1])})" if interval else value

    for label in labels:
        base = flat[reference].get(label)
        cells = [label, cell(reference, label)]
        for name in others:
            cells += [cell(name, label), _delta(flat[name].get(label), base)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def short_names(names: list[str]) -> dict[str, str]:
    """Each model's name as a legend shows it: the last part of a path (as few trailing parts as
    keep the names apart), never a whole absolute path."""
    for depth in range(1, 1 + max(len(Path(name).parts) for name in names)):
        shown = {name: "/".join(Path(name).parts[-depth:]) for name in names}
        if len(set(shown.values())) == len(names):
            return shown
    return {name: name for name in names}


def comparison_figure(report: dict[str, Any]) -> Any | None:
    """Grouped bars of perplexity, of KL to the original, and of task accuracy, stability, retained
    performance and agreement with the original per model, with 95% intervals as error bars; ``None``
    if there is nothing to plot.

    Bars start at zero on a linear axis, so their heights compare as the numbers do (a log axis that
    starts just below the smallest value makes a 3x difference look like 10x); only where one
    perplexity is over 50 times another (a broken cut) is the axis logarithmic, from 1, and the panel
    says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    legend = short_names(names)
    flat = {name: flatten_metrics(report["models"][name]) for name in names}
    intervals = {name: metric_intervals(report["models"][name]) for name in names}
    all_labels = list(dict.fromkeys(label for name in names for label in flat[name]))
    groups = [(title, ylabel, [label for label in all_labels if match(label)])
              for title, ylabel, match in (
                  ("perplexity (lower is better)", "perplexity", lambda l: l.startswith("ppl ")),
                  ("KL to the original (lower is better)", "KL (nats per token)",
                   lambda l: l.startswith("KL to original ")),
                  ("accuracy / stability / retained / agreement (higher is better)", "share (0-1)",
                   lambda l: l.endswith((" acc", " stability")) or l.startswith(("retained", "top-1 agreement "))
                   or l == "generation: identical"))]
    groups = [group for group in groups if group[2]]
    if not groups:
        return None
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False, layout="constrained")
    width = 0.8 / len(names)
    for axis, (title, ylabel, labels) in zip(axes[0], groups):
        drawn = []
        for index, name in enumerate(names):
            values = [flat[name].get(label, math.nan) for label in labels]
            drawn += [v for v in values if math.isfinite(v)]
            spans = [intervals[name].get(label) for label in labels]
            # max(0, ...): an interval's end can sit a rounding error on the far side of the value (one
            # window's interval is that window's perplexity, computed once more), which matplotlib refuses
            errors = [[max(0.0, value - span[0]) if span else 0.0 for value, span in zip(values, spans)],
                      [max(0.0, span[1] - value) if span else 0.0 for value, span in zip(values, spans)]]
            axis.bar([i + index * width for i in range(len(labels))], values, width, label=legend[name], yerr=errors,
                     capsize=2, error_kw={"elinewidth": 0.8})
        axis.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(labels))], labels, rotation=30,
                        ha="right", fontsize=8)
        positive = [v for v in drawn if v > 0]
        if ylabel == "perplexity" and positive and max(positive) > 50 * min(positive):
            axis.set_yscale("log")
            axis.set_ylim(bottom=1)
            title += ", log scale from 1"
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(ylabel)
        axis.set_xlabel("held-out text" if ylabel != "share (0-1)" else "task or measure")
    axes[0][0].legend(fontsize=8)
    return figure


def comparison_plot(report: dict[str, Any]) -> bytes | None:
    """:func:`comparison_figure` as PNG bytes (``None`` if there is nothing to plot)."""
    figure = comparison_figure(report)
    return None if figure is None else png_bytes(figure, dpi=120)


def curve_table(curve: dict[str, Any]) -> str:
    """Markdown: accuracy against the number of kept layers k, one column per head kind."""
    kinds = list(curve["accuracy"])
    ks = sorted({int(k) for kind in kinds for k in curve["accuracy"][kind]})
    lines = ["| k (layers kept) | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for k in ks:
        cells = [_format(curve["accuracy"][kind].get(str(k), curve["accuracy"][kind].get(k))) for kind in kinds]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_plot(curve: dict[str, Any], title: str) -> bytes:
    """PNG: accuracy against k per head kind, with the chance level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    for kind, by_k in curve["accuracy"].items():
        ks = sorted(int(k) for k in by_k)
        axis.plot(ks, [by_k.get(str(k), by_k.get(k)) for k in ks], marker="o", label=kind)
    if "chance" in curve:
        axis.axhline(curve["chance"], linestyle="--", color="grey", label="chance (majority)")
    axis.set_xlabel("k: first layers kept")
    axis.set_ylabel("test accuracy")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return png_bytes(figure, dpi=120)


def curve_path(json_path: Path, index: int) -> Path:
    """Where the classification-curve plot of the ``index``-th model goes."""
    return json_path.with_name(f"{json_path.stem}-curve-{index}.png")


def _curves(report: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """``(model index, title, curve)`` of every model with a classification curve, in the report's order."""
    return [(index, f"{name}: {result['classification'].get('dataset', 'classification')}", result["classification"])
            for index, (name, result) in enumerate(report["models"].items()) if result.get("classification")]


def _headroom_note(report: dict[str, Any]) -> str:
    """The tasks retained-above-chance left out, said once: a reader must know what the mean is over."""
    left_out = sorted({task for result in report["models"].values()
                       for task in (result.get("retained_above_chance") or {}).get("uninformative", [])})
    if not left_out:
        return ""
    return (f"\nRetained above chance leaves out {', '.join(left_out)}: the reference is within its own 95% interval "
            "of chance there, so a ratio over it would measure noise.\n")


def _escaped(text: str) -> str:
    """``text`` on one line of a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def generation_examples(name: str, generation: dict[str, Any]) -> str:
    """Markdown: the prompts and both models' continuations side by side, and where they part."""
    lines = [f"\n### Generation: {name} beside its original\n",
             f"{generation['prompts']} prompts, up to {generation['max_new_tokens']} greedy tokens each: "
             f"{generation['mean_agreed_tokens']:.1f} tokens before the first divergence on average, "
             f"{generation['identical']:.0%} identical.\n", "| prompt | original | model | same tokens |", "|---|---|---|---|"]
    lines += [f"| {_escaped(e['prompt'])} | {_escaped(e['original'])} | {_escaped(e['model'])} | {e['agreed_tokens']} |"
              for e in generation["examples"]]
    return "\n".join(lines) + "\n"


def report_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: the comparison table (and which tasks retained-above-chance leaves out),
    each model's generation examples, then each classification curve's table."""
    markdown = comparison_table(report) + _headroom_note(report)
    for name, result in report["models"].items():
        if "generation" in result:
            markdown += generation_examples(name, result["generation"])
    for _, title, curve in _curves(report):
        markdown += f"\n### Classification curve: {title}\n\n{curve_table(curve)}"
    return markdown


def write_report(report: dict[str, Any], json_path: Path) -> list[Path]:
    """Write the JSON (checked as an ``eval.json`` record, see :mod:`layerprune.evaluation.record`),
    its Markdown (comparison table, then each classification curve) and the plots (``.png``;
    ``-curve-N.png`` per model with a curve) side by side."""
    written = [write_json_atomic(json_path, checked_report(report))]
    plots: list[tuple[Path, bytes | None]] = [(json_path.with_suffix(".png"), comparison_plot(report))]
    for index, title, curve in _curves(report):
        plots.append((curve_path(json_path, index), curve_plot(curve, title)))
    written.append(write_bytes_atomic(json_path.with_suffix(".md"), f"{MARKDOWN_MARK}\n{report_markdown(report)}".encode()))
    written += [write_bytes_atomic(path, png) for path, png in plots if png is not None]
    return written


def update_doc_section(doc: Path, section: str, subsection: str, body: str) -> None:
    """Replace ``subsection`` (a ``###`` heading) inside ``section`` (a ``##`` heading) of ``doc``,
    creating either if missing and leaving every other part of the file as it was."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{subsection}\n\n{body.strip()}\n\n"
    # [ \t]* rather than \s*: the match must end with its heading's line, not swallow the blank lines
    # after it, or every rewrite would add one more of them
    section_match = re.search(rf"^{re.escape(section)}[ \t]*$", text, flags=re.M)
    if section_match is None:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{block}"
    else:
        end_match = re.compile(r"^## ", flags=re.M).search(text, section_match.end())
        end = end_match.start() if end_match else len(text)
        inside = text[section_match.end():end]
        sub = re.search(rf"^{re.escape(subsection)}[ \t]*$", inside, flags=re.M)
        if sub is None:
            inside = inside.rstrip("\n") + f"\n\n{block}"
        else:
            sub_end = re.compile(r"^#{2,3} ", flags=re.M).search(inside, sub.end())
            inside = inside[:sub.start()] + block + (inside[sub_end.start():] if sub_end else "")
        text = text[:section_match.end()] + "\n\n" + inside.lstrip("\n") + text[end:]
    write_bytes_atomic(doc, (text.rstrip("\n") + "\n").encode())
