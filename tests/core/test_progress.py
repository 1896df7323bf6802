"""Progress where stderr is not a terminal (a log, CI, nohup): plain lines for every long step.

The steps here are short, so :data:`layerprune.progress.LINE_SECONDS` is set to 0 (a line at every
update, as a slow step would write one every few seconds); the real interval keeps a step that ends
quickly silent, which the last test checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from layerprune import progress as progress_module
from layerprune.cli.main import main
from layerprune.progress import Progress, set_quiet
from tests.helpers import save_tiny_checkpoint, write_corpus


@pytest.fixture
def every_update(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 0.0)
    yield
    set_quiet(False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("progress")
    return {"model": save_tiny_checkpoint(folder / "tiny", "llama", 4), "text": write_corpus(folder / "text.txt"),
            "held_out": write_corpus(folder / "held-out.txt", documents=60)}


def test_a_line_says_what_how_far_and_the_time_left(every_update, capsys) -> None:
    with Progress("scoring", 4, unit="batches") as tracker:
        tracker.note("loss 1.25")
        tracker.update()
        tracker.update(2)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"scoring: 1/4 batches, 0:00 elapsed, about 0:00 left \(loss 1\.25\)", lines[0])
    assert lines[1].startswith("scoring: 3/4 batches, 0:00 elapsed")


def test_quiet_and_a_short_step_write_nothing(monkeypatch, capsys) -> None:
    with Progress("quick", 3) as tracker:  # the real interval: a step shorter than it says nothing
        tracker.update(3)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 0.0)
    set_quiet(True)
    try:
        for _ in progress_module.progress(range(3), "quiet"):
            pass
    finally:
        set_quiet(False)
    assert capsys.readouterr().err == ""


def _commands(files: dict[str, Path], out: Path) -> dict[str, list[str]]:
    model, text = str(files["model"]), str(files["text"])
    calibration = ["--data", text, "--samples", "8", "--seq-len", "32", "--batch-size", "2"]
    return {
        "score": ["score", "--model", model, "--metrics", "bi,ppl", *calibration, "--output", str(out / "s.json")],
        "eval --ppl": ["eval", "--model", model, "--ppl", text, "--seq-len", "32", "--output", str(out / "e.json")],
        "prune --compensate": ["prune", "--model", model, "--layers", "1-2", "--compensate", "replace-linear",
                               "--ridge", "1", *calibration, "--out", str(out / "p")],
        "search": ["search", "--model", model, *calibration, "--rank-data", str(files["held_out"]), "--rank-windows", "2", "--remove",
                   "1", "--max-candidates", "2", "--no-repair", "--out", str(out / "search")],
    }


EXPECTED = {"score": ["similarity pass", "ppl"], "eval --ppl": ["perplexity"], "prune --compensate": ["repair statistics"],
            "search": ["similarity pass", "search"]}


@pytest.mark.parametrize("command", list(EXPECTED))
def test_every_long_command_reports_progress_off_a_terminal(command, files, every_update, tmp_path, capsys) -> None:
    assert main(_commands(files, tmp_path)[command]) == 0
    err = capsys.readouterr().err
    for what in EXPECTED[command]:
        assert re.search(rf"^{re.escape(what)}: \d+/\d+ \w+, \d+:\d\d elapsed", err, re.M), (what, err)
    assert main(["-q", *_commands(files, tmp_path / "quiet")[command][:]]) == 0
    assert not re.search(r"elapsed", capsys.readouterr().err)


def test_healing_reports_its_steps_and_loss(files, every_update, tmp_path, capsys) -> None:
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(files["model"]), "--layers", "2", "--out", str(pruned)]) == 0
    assert main(["heal", "--model", str(pruned), "--method", "partial-ft", "--data", str(files["text"]),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "healed"), "-v"]) == 0
    assert re.search(r": 2/2 steps, \d+:\d\d elapsed.*\(loss \d", capsys.readouterr().err)
