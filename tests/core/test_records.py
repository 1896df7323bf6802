"""layerprune.json is a typed, versioned record with a shipped JSON Schema, and one calibration
config gives the same calibration whichever front-end runs the stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

import layerprune as lp
from layerprune.cli.main import main
from layerprune.data import CalibrationConfig
from layerprune.models.provenance import FORMAT_VERSION, ProvenanceRecord
from layerprune.models.shards import prune_checkpoint
from layerprune.recipes import run_recipe
from layerprune.records import SCHEMA_DIR, schema_file, schema_text
from tests.helpers import save_tiny_checkpoint, tiny_loaded

ROOT = Path(__file__).resolve().parents[2]
OLD_RECORD = ROOT / "tests" / "fixtures" / "layerprune-before-format-version.json"


def shipped_schema() -> dict:
    return json.loads((SCHEMA_DIR / schema_file(ProvenanceRecord)).read_text())


def test_the_shipped_schemas_are_the_records_own() -> None:
    """The package's and the docs' copies are what the record class generates (python docs/gen_api.py)."""
    assert (SCHEMA_DIR / schema_file(ProvenanceRecord)).read_text() == schema_text(ProvenanceRecord)
    assert (ROOT / "docs" / "schemas" / schema_file(ProvenanceRecord)).read_text() == schema_text(ProvenanceRecord)


def test_every_writer_of_a_checkpoint_writes_a_record_the_schema_accepts(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama", 6)
    lp.prune(loaded, [1, 4], reason="a test cut")
    in_memory = json.loads((lp.save(loaded, tmp_path / "memory") / "layerprune.json").read_text())
    on_files = json.loads((prune_checkpoint(save_tiny_checkpoint(tmp_path / "tiny"), [1, 4], tmp_path / "files",
                                            reason="a test cut") / "layerprune.json").read_text())
    for record in (in_memory, on_files):
        jsonschema.validate(record, shipped_schema())
        assert record["format_version"] == FORMAT_VERSION and record["removed_layers"] == [1, 4]
    with pytest.raises(jsonschema.ValidationError):  # the schema has teeth: a record without its layers fails
        jsonschema.validate({k: v for k, v in in_memory.items() if k != "kept_layers"}, shipped_schema())


def test_a_record_written_before_format_version_still_reads_and_is_carried_on(tmp_path: Path) -> None:
    """The fixture was written by layerprune before records had a version: a 4-layer model cut to layers 0 and 3."""
    folder = save_tiny_checkpoint(tmp_path / "old", "llama", 2)
    shutil.copy(OLD_RECORD, folder / "layerprune.json")
    loaded = lp.load_model(folder)
    assert loaded.lineage["kept_layers"] == [0, 3] and "format_version" not in loaded.lineage
    lp.prune(loaded, [1])
    record = json.loads((lp.save(loaded, tmp_path / "again") / "layerprune.json").read_text())
    jsonschema.validate(record, shipped_schema())
    assert record["removed_layers"] == [1, 2, 3] and record["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize(("change", "message"), [
    ({"format_version": FORMAT_VERSION + 1}, "newer than this layerprune reads"),
    ({"kept_layers": "0,3"}, "kept_layers"),
])
def test_a_record_this_version_cannot_read_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    folder = save_tiny_checkpoint(tmp_path / "bad", "llama", 2)
    (folder / "layerprune.json").write_text(json.dumps({**json.loads(OLD_RECORD.read_text()), **change}))
    with pytest.raises(lp.UsageError, match=message):
        lp.load_model(folder)


CALIBRATION_KEYS = ("source", "split", "samples", "seq_len", "seed", "sampling")


def test_the_same_stage_from_the_command_line_a_recipe_and_python_records_the_same_calibration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No calibration option given anywhere: each front-end falls back on CalibrationConfig's one default."""
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny", "llama", 4)
    assert main(["score", "--model", "tiny", "--metrics", "bi", "--output", "cli.json"]) == 0
    from_cli = json.loads((tmp_path / "cli.json").read_text())["data"]
    (tmp_path / "recipe.yaml").write_text("model: tiny\nscore: {metrics: [bi]}\n")
    run = run_recipe(tmp_path / "recipe.yaml", tmp_path / "run", log=lambda _: None)
    from_recipe = json.loads((run / "scores.json").read_text())["data"]
    loaded = lp.load_model(tmp_path / "tiny")
    from_python = lp.score(loaded, lp.build_calibration(loaded.tokenizer), ["bi"]).to_json()["data"]
    expected = CalibrationConfig().record()
    for recorded in (from_cli, from_recipe, from_python):
        assert {key: recorded.get(key) for key in CALIBRATION_KEYS} == expected
    assert from_cli["rows"] == from_recipe["rows"] == from_python["rows"] == expected["samples"]
