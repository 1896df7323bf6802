"""Nothing lost: ``kill -9`` at random points of ``layerprune prune`` leaves the old state or the
complete new one, and whatever a killed run left behind is never mistaken for output.

A small fork server imports layerprune once and forks one ``layerprune prune`` (the real
``main``) per request, so each killed run costs a fraction of a second instead of an interpreter
start. The server never runs a torch operation itself, which keeps forking safe.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.reliability.conftest import TINY_LAYERS, save_tiny

FORK_SERVER = """
import json, os, sys
from layerprune.cli.main import main
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the pipe to the test carries pids only
        try:
            code = main(json.loads(line))
        finally:
            os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""
KILLS = 12


class ForkServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], kill_after: float | None = None) -> tuple[bool, float]:
        """Run ``layerprune ARGV``; kill -9 it after ``kill_after`` s. Returns (finished, seconds)."""
        start = time.perf_counter()
        self.process.stdin.write(json.dumps(argv) + "\n")
        self.process.stdin.flush()
        pid = int(self.process.stdout.readline())
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = int(self.process.stdout.readline())
        return os.waitstatus_to_exitcode(status) == 0, time.perf_counter() - start

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    forks = ForkServer()
    yield forks
    forks.close()


def removed_layers_of(out: Path) -> list[int]:
    """What a complete output says it is; fails if the folder is partial in any way."""
    record = json.loads((out / "layerprune.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == TINY_LAYERS - len(record["removed_layers"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    return record["removed_layers"]


def visible_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_kill_9_during_overwrite_leaves_old_or_new(server: ForkServer, tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "input")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    out = outputs / "pruned"
    finished, duration = server.run(["prune", "--model", str(model), "--layers", "0", "--out", str(out)])
    assert finished and removed_layers_of(out) == [0]
    current, rng, outcomes = [0], random.Random(0), {"old": 0, "new": 0}
    for attempt in range(KILLS):
        layers = sorted(rng.sample(range(TINY_LAYERS), rng.randint(1, TINY_LAYERS - 1)))
        argv = ["prune", "--model", str(model), "--layers", ",".join(map(str, layers)), "--out", str(out),
                "--overwrite"]
        server.run(argv, kill_after=rng.uniform(0, 1.2 * duration))
        assert visible_entries(outputs) == ["pruned"], f"attempt {attempt}: the output vanished or a stray appeared"
        state = removed_layers_of(out)
        assert state in (current, layers), f"attempt {attempt}: {state} is neither old {current} nor new {layers}"
        outcomes["new" if state == layers and state != current else "old"] += 1
        current = state
    print(f"kill -9 outcomes over {KILLS} overwrites: {outcomes}")
    finished, _ = server.run(["prune", "--model", str(model), "--layers", "3", "--out", str(out), "--overwrite"])
    assert finished and removed_layers_of(out) == [3]
    assert [p.name for p in outputs.iterdir()] == ["pruned"], "stale staging folders of killed runs were cleared"
    assert AutoModelForCausalLM.from_pretrained(model).config.num_hidden_layers == TINY_LAYERS


def test_kill_9_of_a_first_run_leaves_nothing_or_everything(server: ForkServer, tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "input")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    _, duration = server.run(["prune", "--model", str(model), "--layers", "1", "--out", str(outputs / "timing")])
    rng, complete = random.Random(1), 0
    for attempt in range(KILLS // 2):
        out = outputs / f"run{attempt}"
        server.run(["prune", "--model", str(model), "--layers", "2", "--out", str(out)],
                   kill_after=rng.uniform(0, 1.2 * duration))
        if out.exists():
            assert removed_layers_of(out) == [2]
            complete += 1
        finished, _ = server.run(["prune", "--model", str(model), "--layers", "2", "--out", str(out), "--overwrite"])
        assert finished and removed_layers_of(out) == [2], "a re-run after a kill succeeds"
    print(f"kill -9 of first runs: {complete} of {KILLS // 2} had finished")
    assert not [p.name for p in outputs.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_runs_are_cleared_or_restored(tmp_path: Path) -> None:
    from layerprune.outputs import check_output_path

    dead, alive = _dead_pid(), os.getpid()
    retired = tmp_path / f".out.old-{dead}"  # an overwrite killed between its two renames
    retired.mkdir()
    (retired / "weights").write_text("the user's previous output")
    (tmp_path / f".out.partial-{dead}").mkdir()  # half-built by a killed run
    (tmp_path / f".out.partial-{alive}").mkdir()  # being built right now: not ours to touch
    (tmp_path / f".other.partial-{dead}").mkdir()  # another output's business
    with pytest.raises(Exception, match="already exists"):
        check_output_path(tmp_path / "out", overwrite=False)
    assert (tmp_path / "out" / "weights").read_text() == "the user's previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f".out.partial-{alive}", f".other.partial-{dead}"]
    )
