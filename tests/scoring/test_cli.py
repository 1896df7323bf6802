"""`layerprune score` and `layerprune prune --metric`, end to end on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from layerprune.cli import options as cli_options
from layerprune.cli.main import main
from tests.helpers import save_tiny_checkpoint
from tests.core.test_cli import run_cli  # a real process: used once, the rest run in-process to stay fast
from tests.scoring.references import rows_with_padding


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse errors
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def calibration_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Stand in for the data layer's ``build_calibration`` where the CLI calls it: record what the CLI
    asked for and return fixed rows."""
    calls: list[dict] = []

    def build_calibration(tokenizer, source, **options):
        calls.append({"source": source, **options})
        return rows_with_padding()

    monkeypatch.setattr(cli_options, "build_calibration", build_calibration)
    return calls


def test_score_writes_json_figure_and_table(tiny_dir: Path, tmp_path: Path, calibration_calls: list[dict],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores.json"
    code = main(["score", "--model", str(tiny_dir), "--metrics", "bi,angular,block-cosine,ppl,magnitude-l1",
                 "--data", "news-sample", "--samples", "5", "--seq-len", "16", "--seed", "3", "--sampling",
                 "contiguous", "--remove", "2", "--output", str(out)])
    assert code == 0
    assert calibration_calls == [{"source": "news-sample", "split": "train", "samples": 5, "seq_len": 16, "seed": 3,
                                  "sampling": "contiguous", "text_field": None,
                                  "max_positions": 256}]
    document = json.loads(out.read_text())
    assert document["num_layers"] == 6 and document["tokens"] == int(rows_with_padding().attention_mask.sum())
    assert len(document["metrics"]["bi"]) == 6 and len(document["metrics"]["ppl"]) == 6
    assert [len(document["metrics"]["angular"][str(n)]) for n in range(1, 7)] == [6, 5, 4, 3, 2, 1]
    assert set(document["metrics"]["block-cosine"]) == {str(n) for n in range(1, 7)}
    bi = document["metrics"]["bi"]
    expected = sorted(sorted(range(6), key=bi.__getitem__)[:2])
    assert document["selection"] == {"metric": "bi", "strategy": "independent", "remove": expected}
    assert document["data"]["source"] == "news-sample"
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert "layer" in table and "angular" in table and table.count(" x\n") + table.endswith(" x") >= 1


def test_prune_by_metric_scores_selects_and_records(tiny_dir: Path, tmp_path: Path,
                                                    calibration_calls: list[dict]) -> None:
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_dir), "--metric", "angular", "--remove", "50%", "--strategy",
                 "consecutive", "--samples", "5", "--seq-len", "16", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "layerprune.json").read_text())
    chosen = record["recipe"]["selection"]["remove"]
    assert record["removed_layers"] == chosen and len(chosen) == 3 and chosen == list(range(chosen[0], chosen[0] + 3))
    assert record["recipe"]["selection"]["metric"] == "angular" and record["recipe"]["data"]["source"] == "wiki-sample"
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_data_free_metrics_run_without_data(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_options, "build_calibration",
                        lambda *args, **kwargs: pytest.fail("data-free metrics built calibration data"))
    code, _, err = run_in_process(capsys, "score", "--model", tiny_dir, "--metrics", "reverse-order,magnitude-l2",
                                  "--remove", "2", "--output", tmp_path / "s.json")
    assert code == 0, err
    document = json.loads((tmp_path / "s.json").read_text())
    assert document["selection"]["remove"] == [4, 5] and document["tokens"] == 0


@pytest.mark.parametrize(("args", "message"), [
    (["score", "--metrics", "bi,nope"], "unknown metric 'nope'"),
    (["score", "--metrics", "bi", "--remove", "6"], "remove all 6 layers"),
    (["score", "--metrics", "bi", "--remove", "many"], "--remove 'many' cannot be read"),
    (["score", "--metrics", "bi", "--strategy", "consecutive"], "--remove"),
    (["score", "--metrics", "bi", "--seq-len", "1"], "--seq-len"),
    (["score", "--metrics", "bi,ppl", "--select-by", "taylor", "--remove", "1"], "--select-by taylor"),
    (["prune", "--metric", "bi", "--out", "OUT"], "needs --remove"),
    (["prune", "--metric", "bi", "--layers", "1", "--remove", "1", "--out", "OUT"], "either --layers or --metric"),
    (["prune", "--layers", "1", "--remove", "1", "--out", "OUT"], "need --metric"),
])
def test_bad_flags_fail_in_one_line_before_loading(tiny_dir: Path, tmp_path: Path, args: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    code, _, err = run_in_process(capsys, *args[:1], "--model", tiny_dir, *args[1:])
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    out.write_text("{}")
    result = run_cli("score", "--model", str(tiny_dir), "--metrics", "magnitude-l1", "--output", str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_text() == "{}"
