"""What can be checked of a figure without looking at it: every panel labelled, every value inside
its axes, every legend entry a series that is drawn (or one noted as identical to another)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


def data_panels(figure: Figure) -> list[Axes]:
    """The axes that hold data (not colour bars)."""
    return [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]


def plotted_points(axis: Axes) -> list[tuple[float, float]]:
    """Every bar top, line vertex and scatter point of ``axis``, in data coordinates."""
    points: list[tuple[float, float]] = []
    for container in axis.containers:
        if isinstance(container, BarContainer):
            points += [(bar.get_x() + bar.get_width() / 2, bar.get_height()) for bar in container.patches]
    for line in axis.lines:
        if line.get_linestyle() not in ("None", "") or line.get_marker() not in ("None", "", None):
            xs, ys = line.get_xdata(), line.get_ydata()
            if len(xs) == len(ys) and not (len(xs) == 2 and line.get_transform() != axis.transData):
                points += [(float(x), float(y)) for x, y in zip(np.asarray(xs, float), np.asarray(ys, float))]
    for collection in axis.collections:
        if isinstance(collection, PathCollection):
            points += [tuple(map(float, offset)) for offset in collection.get_offsets()]
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def check_figure(figure: Figure, *, min_width_px: int = 300, max_width_px: int = 2400) -> None:
    figure.canvas.draw()  # lays the figure out, as saving would
    width = figure.get_figwidth() * figure.dpi
    assert min_width_px <= width <= max_width_px, f"figure {width:.0f} px wide"
    for axis in data_panels(figure):
        if not axis.has_data():
            continue
        assert axis.get_ylabel().strip(), f"panel {axis.get_title()!r} has no y label"
        ticks_shown = any(tick.get_visible() and tick.get_text() for tick in axis.get_xticklabels())
        assert axis.get_xlabel().strip() or not ticks_shown, f"panel {axis.get_title()!r} has no x label"
        (x_low, x_high), (y_low, y_high) = sorted(axis.get_xlim()), sorted(axis.get_ylim())
        for x, y in plotted_points(axis):
            assert x_low <= x <= x_high and y_low <= y <= y_high, (axis.get_title(), (x, y), axis.get_ylim())
        legend = axis.get_legend()
        if legend is not None:
            for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True):
                label = text.get_text()
                assert label and not label.startswith("/"), f"legend entry {label!r}"
                if isinstance(handle, Line2D) and "=" not in label:  # a series: drawn somewhere in the figure
                    assert any(line.get_label() == label and len(line.get_xdata()) > 0
                               for panel in figure.axes for line in panel.lines), f"{label!r} is not drawn"
