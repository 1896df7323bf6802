"""Layer scores for people: a plain-text table and one PNG figure.

The table shows one row per layer and one column per metric (the raw value the paper reports;
for block metrics the single-layer n=1 entry), with the layers chosen for removal marked. The
figure has a bar chart per metric and, for block metrics, a heatmap of start layer x block size,
which is where the consecutive strategy looks.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from layerprune.outputs import write_bytes_atomic
from layerprune.reporting.figures import png_bytes
from layerprune.scoring.base import MetricResult
from layerprune.scoring.report import ScoreReport
from layerprune.selection import Selection

REMOVED_COLOR = "#d62728"
KEPT_COLOR = "#1f77b4"


def per_layer_values(result: MetricResult) -> list[float]:
    """The raw per-layer values: the list itself, or the n=1 row of a block table."""
    return result.values[1] if isinstance(result.values, dict) else result.values


def _format(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def format_table(report: ScoreReport, selection: Selection | None = None) -> str:
    """A fixed-width table: layer (or branch), original layer index, one column per metric, and the
    ``selection``'s removal mark."""
    labels = report.labels()
    removed = selection.marked(labels) if selection else set()
    columns = {name: [_format(v) for v in per_layer_values(result)] for name, result in report.results.items()}
    unit = "branch" if report.units else "layer"
    headers = [unit, "orig", *columns, "remove"] if removed else [unit, "orig", *columns]
    rows = []
    for index, label in enumerate(labels):
        layer = int(label.rpartition(".")[2])
        row = [label, str(report.layer_ids[layer]), *(column[index] for column in columns.values())]
        if removed:
            row.append("x" if index in removed else "")
        rows.append(row)
    widths = [max(len(header), *(len(row[k]) for row in rows)) for k, header in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    footer = [f"{report.model}: {report.num_layers} layers, {report.tokens} tokens"]
    if selection:
        footer.append(f"remove {selection.units or selection.remove} ({selection.metric}, {selection.strategy})")
    return "\n".join([*lines, "; ".join(footer)])


def _meaning(result: MetricResult) -> str:
    """The first clause of the metric's meaning, as a panel's y label (what its bars measure)."""
    return result.meaning.split(";")[0].strip()


def scores_figure(report: ScoreReport, selection: Selection | None = None) -> Any:
    """The figure: one bar panel per metric (its raw per-layer values, the ``selection``'s layers in
    red, with a legend saying so), then a heat map per block table. A panel's axis is logarithmic only
    where one layer dwarfs the typical one (``ppl`` without layer 0), and its values are then dots (a
    bar's length on a log axis means nothing): a log axis over values that differ by a few percent
    (``block-cosine``'s ~0.95) would make every bar look the same."""
    import matplotlib  # deferred: matplotlib and pyplot cost ~0.3 s, only for a plot

    matplotlib.use("Agg")  # before pyplot's import: no display is ever needed
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    labels = report.labels()
    removed = selection.marked(labels) if selection else set()
    tables = {name: r for name, r in report.results.items() if isinstance(r.values, dict)}
    panels = len(report.results) + len(tables)
    figure, axes = plt.subplots(panels, 1, figsize=(max(6.0, 0.3 * len(labels) + 2), 0.6 + 2.6 * panels),
                                squeeze=False, layout="constrained")
    layers = list(range(len(labels)))
    for axis, (name, result) in zip(axes[:, 0], report.results.items(), strict=False):
        values = per_layer_values(result)
        colours = [REMOVED_COLOR if i in removed else KEPT_COLOR for i in layers]
        finite = sorted(v for v in values if math.isfinite(v))
        if finite and finite[0] > 0 and finite[-1] > 100 * finite[len(finite) // 2]:
            axis.scatter(layers, values, c=colours, s=24)  # on a log axis a bar's length means nothing: dots
            axis.set_yscale("log")
        else:
            axis.bar(layers, values, color=colours)
        axis.set_title(f"{name}" + (" (blocks of n=1)" if name in tables else ""), fontsize=10)
        axis.set_ylabel(textwrap.fill(_meaning(result), 28), fontsize=8)
        axis.set_xticks(layers, labels, rotation=90 if report.units else 0)
        axis.set_xlabel("branch" if report.units else "layer")
        axis.tick_params(labelsize=7)
    if removed:
        axes[0, 0].legend(handles=[Patch(color=REMOVED_COLOR, label=f"selected to remove ({len(removed)})"),
                                   Patch(color=KEPT_COLOR, label="kept")], fontsize=8, loc="upper center",
                          ncols=2, bbox_to_anchor=(0.5, 1.25), frameon=False)
    for axis, (name, result) in zip(axes[len(report.results):, 0], tables.items(), strict=True):
        grid = [[row[i] if i < len(row) else math.nan for i in layers] for _, row in sorted(result.values.items())]
        image = axis.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                            extent=(-0.5, len(labels) - 0.5, 0.5, len(grid) + 0.5))
        axis.set_title(f"{name}: start {'branch' if report.units else 'layer'} x block size", fontsize=10)
        axis.set_xlabel(f"start {'branch' if report.units else 'layer'}")
        axis.set_ylabel("block size n")
        figure.colorbar(image, ax=axis, label=textwrap.fill(_meaning(result), 30))
    figure.suptitle(f"{report.model}: layer scores ({report.tokens} tokens)", fontsize=11)
    return figure


def plot_scores(report: ScoreReport, path: str | Path, selection: Selection | None = None, *,
                overwrite: bool = True) -> Path:
    """Write :func:`scores_figure` as a PNG (atomically) and return its path."""
    return write_bytes_atomic(path, png_bytes(scores_figure(report, selection), dpi=110), overwrite=overwrite)
