"""Each figure rendered from recorded data and checked (see figure_checks); the figures were also
looked at as pictures when they changed."""

from __future__ import annotations

import math

import pytest
import torch

import layerprune as lp
from layerprune.reporting.eval_tables import comparison_figure, short_names
from layerprune.reporting.scores import scores_figure
from tests.helpers import tiny_loaded
from tests.reporting.figure_checks import check_figure, data_panels

ROWS = torch.randint(3, 200, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", 12)


def test_a_one_metric_score_figure_fills_its_canvas_and_marks_the_removed_layers(loaded) -> None:
    report = lp.score(loaded, ROWS, ["bi"], batch_size=4)
    figure = scores_figure(report, lp.select(report, 3, metric="bi"))
    check_figure(figure)
    (panel,) = data_panels(figure)
    figure.canvas.draw()
    box = panel.get_position()
    assert box.height > 0.5  # not a strip at the bottom of an empty canvas
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["selected to remove (3)", "kept"]
    colours = {bar.get_facecolor() for bar in panel.containers[0].patches}
    assert len(colours) == 2


def test_a_score_figure_uses_a_log_axis_only_where_one_layer_dwarfs_the_rest(loaded) -> None:
    report = lp.score(loaded, ROWS, ["bi", "block-cosine", "angular"], batch_size=4)
    figure = scores_figure(report)
    check_figure(figure)
    scales = {axis.get_title(): axis.get_yscale() for axis in data_panels(figure) if axis.containers}
    assert scales["block-cosine (blocks of n=1)"] == "linear"  # ~0.95 each: a log axis would flatten them
    values = report.results["block-cosine"].values[1]
    assert max(values) < 100 * sorted(values)[len(values) // 2]


def _eval_report(broken: bool = False) -> dict:
    def model(ppl: float, acc: float) -> dict:
        return {"num_layers": 12, "parameters": 1000, "perplexity": {"wiki": {"ppl": ppl, "ci95": [ppl * 0.9, ppl * 1.1]}},
                "tasks": {"rt": {"acc": acc, "stderr": 0.02}}}
    return {"models": {"/home/user/models/original": model(33.4, 0.79),
                       "/home/user/out/cut-25": model(131.8 if not broken else 40000.0, 0.68)}}


def test_eval_perplexity_bars_start_at_zero_with_labels_and_short_names() -> None:
    figure = comparison_figure(_eval_report())
    check_figure(figure)
    ppl, accuracy = data_panels(figure)
    assert ppl.get_yscale() == "linear" and ppl.get_ylim()[0] == 0  # heights compare as the numbers do
    assert ppl.get_ylabel() == "perplexity" and accuracy.get_ylabel() == "share (0-1)"
    assert [t.get_text() for t in ppl.get_legend().get_texts()] == ["original", "cut-25"]


def test_eval_perplexity_of_a_broken_cut_goes_log_from_one_and_says_so() -> None:
    ppl, _ = data_panels(comparison_figure(_eval_report(broken=True)))
    assert ppl.get_yscale() == "log" and math.isclose(ppl.get_ylim()[0], 1) and "log scale" in ppl.get_title()


def test_short_names_keep_models_apart() -> None:
    assert short_names(["/a/x/model", "/b/y/model"]) == {"/a/x/model": "x/model", "/b/y/model": "y/model"}
