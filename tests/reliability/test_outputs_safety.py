"""Never lose a user's file (issue 21): outputs that would swallow an input, what ``--overwrite``
may replace, write failures, bad numbers, races and interruptions, through the real CLI.

Every case ends with exit code 2 and one line on stderr naming the problem and the fix; nothing is
written, every input is untouched and no ``.partial`` staging file or folder stays behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import SafetensorError
import torch

from layerprune import outputs
from layerprune.errors import UsageError
from layerprune.recipes import runner
from layerprune.outputs import NOT_OURS
from tests.helpers import record_text, write_corpus
from tests.reliability.conftest import CliResult, assert_refused, snapshot

Cli = Callable[..., CliResult]
ROOT = Path(__file__).resolve().parents[2]


def no_leftovers(folder: Path) -> list[str]:
    """Staging names (``.NAME.partial-PID``) anywhere under ``folder``: a failed write must leave none."""
    return [str(path) for path in folder.rglob("*") if ".partial-" in path.name]


@pytest.fixture
def model(tiny_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint at ``tmp_path/models/src``, so a test may point outputs at its parent."""
    folder = tmp_path / "models" / "src"
    folder.mkdir(parents=True)
    for item in tiny_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    return folder


# --- 1. an output never is, contains or lies inside an input -----------------------------------

def swallowing_cases(model: Path, corpus: Path, tmp: Path) -> dict[str, list[str | Path]]:
    """Commands whose output is, contains or lies inside one of their inputs (all with --overwrite)."""
    recipe = tmp / "recipes" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(f"model: {model}\ncalibration: {{source: {corpus}, samples: 2, seq_len: 8}}\n"
                      "score: {metrics: [bi]}\n")
    link = tmp / "link-to-model"
    link.symlink_to(model)
    original = tmp / "original"
    original.mkdir()
    (original / "config.json").write_text("{}")
    record = json.loads(record_text("layerprune-before-format-version.json"))
    (model / "layerprune.json").write_text(json.dumps({**record, "source_model": str(original)}))
    return {
        "prune into the model's parent": ["prune", "--model", model, "--layers", "1", "--out", model.parent],
        "prune onto a symlink to the model": ["prune", "--model", model, "--layers", "1", "--out", link],
        "prune through ..": ["prune", "--model", model, "--layers", "1", "--out", model / "x" / ".." / ".."],
        "eval over the model's config": ["eval", "--model", model, "--ppl", corpus, "--seq-len", "8",
                                         "--output", model / "config.json"],
        "eval over the compared model": ["eval", "--model", model, "--compare", corpus.parent, "--ppl", corpus,
                                         "--seq-len", "8", "--output", corpus.parent / "r.json"],
        "score over its data file": ["score", "--model", model, "--data", corpus,
                                     "--output", corpus.with_suffix(".json"), "--plot", corpus],
        "score spilling into the model": ["score", "--model", model, "--streaming", "--spill-dir", model / "spill",
                                          "--output", tmp / "s.json"],
        "heal over its data's folder": ["heal", "--model", model, "--method", "partial-ft", "--data", corpus,
                                        "--out", corpus.parent],
        "heal checkpoints in the model": ["heal", "--model", model, "--method", "partial-ft", "--data", corpus,
                                          "--out", tmp / "healed", "--checkpoint-dir", model / "ckpt"],
        "heal into the lineage's original": ["heal", "--model", model, "--method", "partial-ft", "--data", corpus,
                                             "--out", original / "healed"],
        "run over its recipe's folder": ["run", recipe, "--out", recipe.parent, "--allow-path", tmp],
    }


CASES = ["prune into the model's parent", "prune onto a symlink to the model", "prune through ..",
         "eval over the model's config", "eval over the compared model", "score over its data file",
         "score spilling into the model", "heal over its data's folder", "heal checkpoints in the model",
         "heal into the lineage's original", "run over its recipe's folder"]


@pytest.mark.parametrize("case", CASES)
def test_an_output_that_would_swallow_an_input_is_refused(case: str, model: Path, cli: Cli, tmp_path: Path,
                                                          no_weight_loading: None) -> None:
    (tmp_path / "data").mkdir()
    corpus = write_corpus(tmp_path / "data" / "corpus.txt")
    argv = swallowing_cases(model, corpus, tmp_path)
    assert set(argv) == set(CASES)
    before = snapshot(tmp_path)
    assert_refused(cli(*argv[case], "--overwrite"), "input")
    assert snapshot(tmp_path) == before


# --- 2. what --overwrite may replace ---------------------------------------------------------------

def test_an_empty_out_is_refused(model: Path, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 no_weight_loading: None) -> None:
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", "", "--overwrite"), "--out is empty")
    assert_refused(cli("score", "--model", model, "--output", " ", "--overwrite"), "--output is empty")
    assert_refused(cli("score", "--model", model, "--output", ""), "--output is empty")
    assert_refused(cli("score", "--model", model, "--plot", ""), "--plot is empty")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("place", ["a user's folder", "the current directory", "the home directory", "the root"])
def test_overwrite_refuses_what_layerprune_did_not_write(place: str, model: Path, cli: Cli, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         no_weight_loading: None) -> None:
    users = tmp_path / "work"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(users)
    monkeypatch.setenv("HOME", str(users))
    out = {"a user's folder": users, "the current directory": ".", "the home directory": "~",
           "the root": "/"}[place]
    before = snapshot(tmp_path)
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", out, "--overwrite"), NOT_OURS)
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_an_empty_current_directory(model: Path, cli: Cli, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", ".", "--overwrite"), NOT_OURS)


def test_overwrite_replaces_an_empty_folder_and_a_layerprune_output(model: Path, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert cli("prune", "--model", model, "--layers", "1", "--out", out, "--overwrite").code == 0
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [1]
    assert cli("prune", "--model", model, "--layers", "2", "--out", out, "--overwrite").code == 0
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [2]


def test_a_search_folder_counts_as_a_layerprune_output(tmp_path: Path) -> None:
    """A search folder holds its record at the top (the model is one level down): --overwrite may
    replace it, and nothing else that merely contains a model folder."""
    searched = tmp_path / "searched"
    (searched / "model").mkdir(parents=True)
    (searched / "model" / "layerprune.json").write_text(record_text("layerprune-before-format-version.json"))
    with pytest.raises(UsageError, match="not a layerprune output"):
        outputs.check_output_path(searched, overwrite=True)
    (searched / "search.json").write_text("{}")  # the name alone is not layerprune's record: refused
    with pytest.raises(UsageError, match="not a layerprune output"):
        outputs.check_output_path(searched, overwrite=True)
    (searched / "search.json").write_text(record_text("search.json"))
    assert outputs.check_output_path(searched, overwrite=True) == searched.resolve()


@pytest.mark.parametrize("content", [b"my notes", b'["a json list is not a results file"]'])
def test_overwrite_refuses_a_file_layerprune_did_not_write(content: bytes, model: Path, cli: Cli,
                                                           tmp_path: Path, no_weight_loading: None) -> None:
    mine = tmp_path / "notes.json"
    mine.write_bytes(content)
    assert_refused(cli("score", "--model", model, "--metrics", "random", "--output", mine, "--overwrite"), NOT_OURS)
    plot = tmp_path / "holiday.png"
    plot.write_bytes(b"JFIF not a png")
    assert_refused(cli("score", "--model", model, "--output", tmp_path / "s.json", "--plot", plot, "--overwrite"),
                   NOT_OURS)
    assert mine.read_bytes() == content and plot.read_bytes() == b"JFIF not a png"


@pytest.mark.parametrize("name", ["run.json", "search.json", "layerprune.json"])
def test_a_users_folder_is_not_ours_because_a_file_has_one_of_our_names(name: str, model: Path, cli: Cli,
                                                                          tmp_path: Path) -> None:
    """A thesis folder that happens to hold a file called run.json is recognised by content, not name."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / name).write_text(json.dumps({"chapter": 3, "draft": True}))
    (folder / "thesis.tex").write_text("\\section{Results}")
    before = snapshot(folder)
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", folder, "--overwrite"), NOT_OURS)
    assert snapshot(folder) == before


def test_every_sibling_an_output_writes_is_an_output(model: Path, cli: Cli, tmp_path: Path) -> None:
    """eval --output r.json also writes r.md and r.png: the user's own r.md is never replaced, not even with
    --overwrite, and is named in the refusal; the same for score's figure beside its JSON."""
    notes = tmp_path / "r.md"
    notes.write_text("# my notes on the run\n")
    corpus = write_corpus(tmp_path / "corpus.txt")
    for flags in ([], ["--overwrite"]):
        result = cli("eval", "--model", model, "--ppl", corpus, "--seq-len", "8", "--output", tmp_path / "r.json",
                     *flags)
        assert_refused(result, str(notes))
    assert notes.read_text() == "# my notes on the run\n" and not (tmp_path / "r.json").exists()
    picture = tmp_path / "s.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)  # a PNG, but not one layerprune drew
    assert_refused(cli("score", "--model", model, "--metrics", "random", "--output", tmp_path / "s.json",
                       "--overwrite"), str(picture), NOT_OURS)
    assert not (tmp_path / "s.json").exists()


def test_a_name_with_glob_characters_guards_its_own_siblings(model: Path, cli: Cli, tmp_path: Path) -> None:
    """r[1]-curve-0.png is a sibling of r[1].json: without --overwrite it is never replaced."""
    curve = tmp_path / "r[1]-curve-0.png"
    curve.write_bytes(b"the user's picture")
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert_refused(cli("eval", "--model", model, "--ppl", corpus, "--seq-len", "8", "--output", tmp_path / "r[1].json"),
                   "already exists")
    assert curve.read_bytes() == b"the user's picture"


def test_our_own_outputs_are_recognised_by_content_and_replaced(model: Path, cli: Cli, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    report = tmp_path / "r.json"
    command = ["eval", "--model", model, "--ppl", corpus, "--seq-len", "8", "--output", report]
    assert cli(*command).code == 0
    assert outputs.is_layerprune_file(report.with_suffix(".md")) and outputs.is_layerprune_file(report.with_suffix(".png"))
    assert cli(*command, "--overwrite").code == 0
    out = tmp_path / "pruned"
    assert cli("prune", "--model", model, "--layers", "1", "--out", out).code == 0
    assert outputs.is_layerprune_folder(out)
    assert cli("prune", "--model", model, "--layers", "2", "--out", out, "--overwrite").code == 0


def test_overwrite_replaces_the_files_layerprune_wrote(model: Path, cli: Cli, tmp_path: Path) -> None:
    output = tmp_path / "scores.json"
    assert cli("score", "--model", model, "--metrics", "random", "--output", output).code == 0
    assert cli("score", "--model", model, "--metrics", "random", "--seed", "1", "--output", output,
               "--overwrite").code == 0
    assert json.loads(output.read_text())["num_layers"] == 4


# --- 3. write failures: one line each, nothing left behind ----------------------------------------

FAILURES = {errno.EROFS: "read-only", errno.ENOSPC: "disk is full", errno.ENAMETOOLONG: "too long",
            errno.ENOTDIR: "not a folder", errno.EDQUOT: "quota"}


@pytest.mark.parametrize("code", sorted(FAILURES))
def test_a_failed_file_write_is_one_line(code: int, model: Path, cli: Cli, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def failing(self: Path, data: bytes) -> int:
        if ".partial-" in self.name:
            real(self, data[: len(data) // 2])  # half a file written, then the disk gives up
            raise OSError(code, os.strerror(code), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    result = cli("score", "--model", model, "--metrics", "random", "--output", tmp_path / "out" / "s.json")
    assert_refused(result, "cannot write", FAILURES[code])
    assert no_leftovers(tmp_path) == [] and not (tmp_path / "out" / "s.json").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_a_failed_model_write_is_one_line(code: int, model: Path, cli: Cli, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(shard: object, path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr("layerprune.models.shards.write_shard", failing)
    result = cli("prune", "--model", model, "--layers", "1", "--out", tmp_path / "out")
    assert_refused(result, "cannot write", FAILURES[code])
    assert no_leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_read_only_disk_is_named_before_any_work(model: Path, cli: Cli, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, no_weight_loading: None) -> None:
    """A read-only mount reports no free space; the reason to give is that it is read-only."""
    monkeypatch.setattr(outputs.os, "access", lambda path, mode, **kw: False)
    monkeypatch.setattr(outputs, "_read_only", lambda folder: True)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: type("U", (), {"free": 2**20})())
    before = snapshot(tmp_path)
    for argv in (["prune", "--model", model, "--layers", "1", "--out", tmp_path / "out"],
                 ["score", "--model", model, "--output", tmp_path / "s.json"],
                 ["heal", "--model", model, "--method", "partial-ft", "--data", "wiki-sample", "--out", tmp_path / "h"],
                 ["eval", "--model", model, "--ppl", "wiki-sample", "--seq-len", "8", "--output", tmp_path / "e.json"]):
        result = cli(*argv)
        assert_refused(result, "read-only")
        assert "disk space" not in result.stderr
    assert snapshot(tmp_path) == before


def test_a_real_name_too_long_and_a_path_under_a_file_are_one_line(model: Path, cli: Cli, tmp_path: Path,
                                                                   no_weight_loading: None) -> None:
    (tmp_path / "a-file").write_text("x")
    assert_refused(cli("score", "--model", model, "--output", tmp_path / ("x" * 300 + ".json")), "too long")
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", tmp_path / ("y" * 300)), "too long")
    assert_refused(cli("score", "--model", model, "--output", tmp_path / "a-file" / "s.json"), "is a file")
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", tmp_path / "a-file" / "o"), "is a file")
    (tmp_path / "a-folder").mkdir()
    assert_refused(cli("score", "--model", model, "--output", tmp_path / "a-folder"), "is a folder", "results.json")
    assert_refused(cli("score", "--model", model, "--streaming", "--spill-dir", tmp_path / "none"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "models"]
    assert list((tmp_path / "a-folder").iterdir()) == []


# --- 4. bad numbers, refused up front ----------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "0", "-1e-4"])
def test_heal_refuses_a_learning_rate_that_cannot_train(value: str, model: Path, cli: Cli, tmp_path: Path,
                                                        no_weight_loading: None) -> None:
    result = cli("heal", "--model", model, "--method", "partial-ft", "--data", "wiki-sample", "--lr", value,
                 "--out", tmp_path / "h")
    assert result.code == 2 and len(result.stderr_lines) == 1, result.stderr
    assert "--lr" in result.stderr or "learning rate" in result.stderr
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "100000"], "longer than the context"),
    (["--seq-len", "1"], "--seq-len"),
    (["--max-windows", "0"], "--max-windows"),
    (["--batch-size", "-2"], "--batch-size"),
    (["--num-fewshot", "-1"], "--num-fewshot"),
    (["--compare", ",,"], "empty entry"),
    (["--compare", "MODEL,"], "empty entry"),
    (["--lr", "nan"], "finite"),
])
def test_eval_refuses_bad_numbers_and_lists_before_loading(flags: list[str], message: str, model: Path, cli: Cli,
                                                           tmp_path: Path, no_weight_loading: None) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    flags = [str(model) if flag == "MODEL" else flag.replace("MODEL", str(model)) for flag in flags]
    seq_len = [] if "--seq-len" in flags else ["--seq-len", "8"]
    result = cli("eval", "--model", model, "--ppl", corpus, *seq_len, *flags, "--output", tmp_path / "e.json")
    assert result.code == 2 and len(result.stderr_lines) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "e.json").exists()


def test_eval_tasks_without_lm_eval_names_the_extra(model: Path, cli: Cli, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, no_weight_loading: None) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    assert_refused(cli("eval", "--model", model, "--tasks", "arc-offline", "--output", tmp_path / "e.json"),
                   "pip install 'layerprune[eval]'")


class Unsafe:
    """Any class outside torch's safe list makes the weights-only unpickler refuse the file."""


def test_allow_pickle_on_a_pickle_the_safe_loader_refuses(pickle_dir: Path, cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "unsafe"
    folder.mkdir()
    for item in pickle_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    torch.save({"weight": Unsafe()}, folder / "pytorch_model.bin")
    assert_refused(cli("info", "--model", folder, "--allow-pickle"), "safe loader", "safetensors")


# --- 5. races and interruptions -----------------------------------------------------------------------

def test_an_output_that_appears_while_writing_is_never_replaced(model: Path, cli: Cli, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two prunes to one --out: the later one to finish fails cleanly and the first's output stays."""
    out = tmp_path / "out"
    real = outputs.apply_umask

    def other_run_finishes_first(folder: Path) -> None:
        out.mkdir()
        (out / "layerprune.json").write_text('{"winner": true}')
        real(folder)

    monkeypatch.setattr(outputs, "apply_umask", other_run_finishes_first)
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", out), "appeared")
    assert json.loads((out / "layerprune.json").read_text()) == {"winner": True}
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("renameat2", [True, False])
def test_a_results_file_that_appears_while_writing_is_never_replaced(renameat2: bool, model: Path, cli: Cli,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "scores.json"
    real = Path.write_bytes
    if not renameat2:
        monkeypatch.setattr(outputs, "_renameat2", lambda first, second, flags: False)

    def other_run_finishes_first(self: Path, data: bytes) -> int:
        if ".partial-" in self.name:
            real(output, b'{"winner": true}')
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", other_run_finishes_first)
    assert_refused(cli("score", "--model", model, "--metrics", "random", "--output", output), "appeared")
    assert json.loads(output.read_text()) == {"winner": True}
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("other", ["a folder with files", "an empty folder"])
def test_no_replace_rename_without_renameat2(other: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel lacks RENAME_NOREPLACE, an output that appeared is still never replaced."""
    monkeypatch.setattr(outputs, "_renameat2", lambda first, second, flags: False)
    target = tmp_path / "out"
    with pytest.raises(outputs.UsageError, match="appeared"), outputs.atomic_output_dir(target) as staging:
        (staging / "mine").write_text("new")
        target.mkdir()
        if other == "a folder with files":
            (target / "theirs").write_text("old")
    assert not (target / "mine").exists() and no_leftovers(tmp_path) == []


def test_two_prunes_started_together_one_wins(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "layerprune.cli.main", "prune", "--model", str(model), "--layers", "1",
               "--out", str(out)]
    runs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser, loser
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [1]
    assert no_leftovers(tmp_path) == []


def test_a_run_failing_in_its_first_stage_leaves_no_run_folder(model: Path, cli: Cli, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\ncalibration: {{source: {corpus}, samples: 2, seq_len: 8}}\n"
                      "score: {metrics: [bi]}\n")

    def too_short(ctx: object) -> None:
        raise outputs.UsageError("the calibration text is too short; use a longer corpus")

    monkeypatch.setattr(runner, "STAGES", tuple(runner.Stage(s.name, s.needs, too_short) if s.name == "score" else s
                                                 for s in runner.STAGES))
    assert_refused(cli("run", recipe, "--out", tmp_path / "run"), "too short")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_the_command_starts_prints_no_traceback(tmp_path: Path) -> None:
    """The console entry imports only the light package; torch is imported inside main()'s guard."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    entry = "import sys; from layerprune.cli.main import main; sys.exit(main())"
    process = subprocess.Popen([sys.executable, "-c", entry, "info", "--model", str(tmp_path / "none")], env=env,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the interpreter is up; torch and transformers take seconds more to import
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=120)
    stderr = process.stderr.read()
    assert code == 130 and stderr == "layerprune: interrupted while starting; nothing was written\n", (code, stderr)


def test_importing_the_package_imports_no_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    probe = "import sys, layerprune, layerprune.cli.main; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_a_disk_that_fills_during_an_in_memory_save_is_one_line(model: Path, cli: Cli, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports a full disk as its own error (its message holds the system's code): one line,
    nothing left behind, as for every other failed write."""
    def full_disk(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a shard")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full_disk)
    result = cli("prune", "--model", model, "--layers", "1", "--compensate", "merge", "--out", tmp_path / "out")
    assert_refused(result, "cannot write", FAILURES[errno.ENOSPC])
    assert no_leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
