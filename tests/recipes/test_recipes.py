"""Recipes: schema validation with line numbers, path confinement, and a resumable end-to-end run."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from layerprune.cli.main import main
from layerprune.errors import UsageError
from layerprune.recipes import load_recipe, run_recipe
from layerprune.recipes import runner
from layerprune.recipes.record import RunDocument
from layerprune.records import SCHEMA_DIR, newest_version, schema_file, schema_text
from tests.helpers import save_tiny_checkpoint, write_corpus

SHIPPED = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipes_validate_for_smollm2_by_default(recipe: Path, tmp_path: Path) -> None:
    loaded = load_recipe(recipe)
    assert loaded.model == "smollm2-135m"
    runner.preflight(loaded, tmp_path / "run")  # every stage's own checks, against SmolLM2's 30 layers
    assert load_recipe(recipe, model="gemma3-270m").model == "gemma3-270m"


# the sizes and text that make a shipped recipe run in seconds on a 6-layer tiny model; the stages stay the same
TINY_SIZES = {"samples": 8, "seq_len": 32, "steps": 2, "batch_size": 4, "train_size": 16, "test_size": 8,
              "epochs": 1, "ks": [1, 2], "source": "corpus.txt", "data": "corpus.txt", "ppl": ["corpus.txt"],
              "verbalizer": ["negative", "positive"]}  # the byte tokenizer splits " negative" into " " first


def _shrunk(values: Any) -> Any:
    if isinstance(values, dict):
        return {key: TINY_SIZES.get(key, _shrunk(value)) for key, value in values.items()}
    return values


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipes_run_end_to_end_on_a_tiny_model(recipe: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny", "llama", 6)
    write_corpus(tmp_path / "corpus.txt")
    values = _shrunk(yaml.safe_load(recipe.read_text()))
    values["model"] = "tiny"
    if "search" in values:  # a local calibration file has no held-out split: rank on other text
        (tmp_path / "held-out.txt").write_text("\n\n".join(f"Entry {i}: {i * 3} comes after {i}." for i in range(200)))
        values["search"]["rank_data"] = "held-out.txt"
    if "eval" in values and "ppl" in values["eval"]:
        values["eval"]["max_windows"] = 2
    small = tmp_path / recipe.name
    small.write_text(yaml.safe_dump(values))
    out = run_recipe(small, tmp_path / "run", log=lambda _: None)
    stages = [stage for stage, section in (("score", "score"), ("prune", "select"), ("search", "search"),
                                           ("heal", "heal"), ("eval", "eval")) if section in values]
    assert list(json.loads((out / "run.json").read_text())["stages"]) == stages
    assert json.loads((out / "eval.json").read_text())["models"]
    if "prune" in stages:
        record = json.loads((out / "model" / "layerprune.json").read_text())
        # 25% of 6 layers go; a replacement puts one module back in their place
        assert record["num_layers"] == 6 - 2 + len(record["replaced_blocks"])
        healed_by = [values["heal"]["method"]] if "heal" in values else []
        assert [step["method"] for step in record.get("healing", [])] == healed_by


def test_every_recipe_the_docs_name_is_shipped_and_named_after_its_file() -> None:
    """The docs are what users run; the recipes folder, which the tests above validate and run
    recipe by recipe, must hold each one they name (an empty glob would skip those tests silently)."""
    root = Path(__file__).parents[2]
    docs = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    named = {match for doc in docs for match in re.findall(r"\brecipes/([\w.-]+)\.yaml\b", doc.read_text())}
    assert SHIPPED and named
    assert named <= {recipe.stem for recipe in SHIPPED}
    for recipe in SHIPPED:
        assert yaml.safe_load(recipe.read_text())["name"] == recipe.stem, recipe


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: m\nscore:\n  metrics: [bi]\n  positons: last\n", r"line 4: unknown key 'positons' in section 'score'"),
        ("model: m\nscore: {metrics: [bi]}\nselect:\n  remove: [1, 2]\n", r"line 4: 'remove' must be int or str"),
        ("model: m\nheal:\n  steps: 5\n", r"line 2: section 'heal' is missing the required key\(s\) method, data"),
        ("model: m\nscoring: {}\n", r"line 2: unknown key 'scoring' in the recipe"),
        ("model: m\nselect: {remove: 2}\n", r"'select' needs a 'score' section"),
        ("score: {metrics: [bi]}\n", r"names no model"),
        ("model: m\nload: {dtype: float32}\n", r"no stage to run; add a score, heal or eval section"),
        ("model: m\neval:\n  classify: rotten-tomatoes\n  classification: {ks: [1], epochs: two}\n",
         r"line 4: 'epochs' must be int"),
        ("model: [a\n", r"line 2: not valid YAML"),
        ("- just\n- a list\n", r"must be a mapping"),
        ("model: !!python/object/apply:os.system [echo hi]\n", r"not valid YAML"),
        ("model: a\nscore: {metrics: [bi]}\nmodel: b\n", r"line 3: key 'model' is given twice \(first on line 1\)"),
        ("model: m\nscore:\n  metrics: [bi]\n  batch_size: 2\n  batch_size: 4\n",
         r"line 5: key 'score.batch_size' is given twice \(first on line 4\)"),
    ],
)
def test_bad_recipes_name_the_line_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_recipe(_write(tmp_path, text))


def test_recipe_paths_may_not_escape_the_named_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    monkeypatch.chdir(recipes)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    text = f"model: m\ncalibration: {{source: {outside}}}\nscore: {{metrics: [bi]}}\n"
    with pytest.raises(UsageError, match="line 2: path .* lies outside"):
        load_recipe(_write(recipes, text))
    with pytest.raises(UsageError, match="lies outside"):
        load_recipe(_write(recipes, "model: ../other-model\n"))
    assert load_recipe(_write(recipes, text), allowed_paths=[tmp_path]).sections["calibration"]["source"] == str(outside)


@pytest.fixture
def tiny_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny", "llama", 6)
    write_corpus(tmp_path / "corpus.txt")
    return _write(tmp_path, """\
        model: tiny
        calibration: {source: corpus.txt, samples: 8, seq_len: 32}
        score: {metrics: [bi, block-cosine], batch_size: 4}
        select: {metric: block-cosine, remove: 2, strategy: consecutive}
        heal: {method: partial-ft, data: corpus.txt, steps: 4, batch_size: 4, seq_len: 32, train_layers: 1}
        eval: {ppl: [corpus.txt], fidelity: [corpus.txt], generation: 2, generation_prompts: corpus.txt,
               prompt_tokens: 8, generation_tokens: 4, seq_len: 32}
        """)


def test_run_replays_the_pipeline_and_resumes_after_a_failure(tiny_setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tiny_setup.parent / "run"
    real_eval = runner._stage_eval

    def crash(ctx):
        raise RuntimeError("power cut")

    monkeypatch.setattr(runner, "STAGES", tuple(s if s.name != "eval" else runner.Stage("eval", "eval", crash)
                                                for s in runner.STAGES))
    with pytest.raises(RuntimeError):
        run_recipe(tiny_setup, out, log=lambda _: None)
    state = json.loads((out / "run.json").read_text())
    assert list(state["stages"]) == ["score", "prune", "heal"]
    healed_weights = (out / "model" / "model.safetensors").read_bytes()

    with pytest.raises(UsageError, match="^overwrite is off .* resume it"):
        run_recipe(tiny_setup, out, log=lambda _: None)
    monkeypatch.setattr(runner, "STAGES", tuple(s if s.name != "eval" else runner.Stage("eval", "eval", real_eval)
                                                for s in runner.STAGES))
    messages: list[str] = []
    run_recipe(tiny_setup, out, resume=True, log=messages.append)
    assert "[heal] already done, skipping" in messages
    assert (out / "model" / "model.safetensors").read_bytes() == healed_weights
    scores = json.loads((out / "scores.json").read_text())
    assert scores["selection"]["remove"] == state["stages"]["score"]["remove"]
    assert len(scores["selection"]["remove"]) == 2
    record = json.loads((out / "model" / "layerprune.json").read_text())
    assert record["removed_layers"] == scores["selection"]["remove"]
    assert record["healing"][0]["method"] == "partial-ft"
    assert "model: tiny" in record["recipe"]["text"]
    report = json.loads((out / "eval.json").read_text())
    assert len(report["models"]) == 3  # original, pruned, healed
    original, *cuts = report["models"].values()
    assert "fidelity" not in original and "generation" not in original  # each cut against the original
    for cut in cuts:
        assert cut["fidelity"]["corpus.txt"]["tokens"] == cut["perplexity"]["corpus.txt"]["tokens"]
        assert cut["fidelity"]["corpus.txt"]["original"] == "tiny" and cut["generation"]["prompts"] == 2
    assert (out / "eval.md").exists() and (out / "scores.png").exists() and (out / "recipe.yaml").exists()


def test_run_cli_refuses_a_bad_recipe_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "model: m\nheal: {method: lora, data: x, stepz: 3}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown key 'stepz'" in error[0] and "line 2" in error[0]
    assert not (tmp_path / "out").exists()


def test_a_stage_killed_after_writing_its_output_runs_again_on_resume(tiny_setup: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between a stage's atomic write and its record in run.json leaves a complete output
    that run.json does not know; the resumed run must redo the stage over it, not refuse."""
    out = tiny_setup.parent / "run"
    real_prune = runner._stage_prune

    def prune_then_die(ctx: runner.RunContext) -> dict:
        real_prune(ctx)
        raise KeyboardInterrupt("killed before run.json records the stage")

    stages = {stage.name: stage for stage in runner.STAGES}
    monkeypatch.setattr(runner, "STAGES", (stages["score"], runner.Stage("prune", "select", prune_then_die)))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tiny_setup, out, log=lambda _: None)
    assert (out / "pruned").is_dir() and "prune" not in json.loads((out / "run.json").read_text())["stages"]
    monkeypatch.setattr(runner, "STAGES", (stages["score"], stages["prune"]))
    run_recipe(tiny_setup, out, resume=True, log=lambda _: None)
    assert "prune" in json.loads((out / "run.json").read_text())["stages"]


PREFLIGHT_RECIPE = {
    "model": "model: tiny",
    "calibration": "calibration: {source: corpus.txt, samples: 8, seq_len: 32}",
    "score": "score: {metrics: [bi, block-cosine], batch_size: 4}",
    "select": "select: {metric: block-cosine, remove: 2, strategy: consecutive}",
    "heal": "heal: {method: partial-ft, data: corpus.txt, steps: 4, batch_size: 4, seq_len: 32, train_layers: 1}",
    "eval": "eval: {ppl: [corpus.txt], seq_len: 32}",
}


@pytest.mark.parametrize(
    ("section", "line", "fragments"),
    [
        ("model", "model: ./nowhere", ["model './nowhere' does not exist", "pass a checkpoint folder"]),
        ("calibration", "calibration: {source: missing.txt}", ["line 2:", "data file missing.txt does not exist",
                                                                "check the path"]),
        ("calibration", "calibration: {source: corpus.txt, samples: 0}", ["line 2:", "calibration.samples must be at least 1"]),
        ("score", "score: {metrics: [bii]}", ["line 3:", "unknown metric 'bii'", "choose one of:"]),
        ("select", "select: {remove: two}", ["line 4:", "select.remove 'two' cannot be read", "give a layer count"]),
        ("select", "select: {remove: 6}", ["line 4:", "would remove all 6 layers", "keep at least one"]),
        ("select", "select: {remove: 120%}", ["line 4:", "must be more than 0 and less than all layers"]),
        ("select", "select: {remove: 2, metric: angular}", ["line 4:", "metric 'angular' was not scored",
                                                           "score it too"]),
        ("select", "select: {remove: 2, strategy: greedy}", ["line 4:", "unknown strategy 'greedy'", "choose one of"]),
        ("heal", "heal: {method: partial-fT, data: corpus.txt}", ["line 5:", "unknown healing method 'partial-fT'",
                                                                  "choose one of: "]),
        ("heal", "heal: {method: partial-ft, data: gone.jsonl}", ["line 5:", "data file gone.jsonl does not exist"]),
        ("heal", "heal: {method: partial-ft, data: corpus.txt, train_layers: 5}",
         ["line 5:", "heal.train_layers 5 exceeds the model's 4 layers", "choose 1..4"]),
        ("heal", "heal: {method: partial-ft, data: corpus.txt, steps: 0}", ["line 5:", "steps must be at least 1"]),
        ("heal", "heal: {method: lora, data: self-generated, prompts: gone.txt}",
         ["line 5:", "data file gone.txt does not exist"]),
        ("heal", "heal: {method: lora, data: self-generated}", ["line 5:", "heal.prompts is needed with data "
                                                                           "self-generated"]),
        ("eval", "eval: {seq_len: 32}", ["line 6:", "nothing to evaluate", "ask for ppl, fidelity, generation, tasks"]),
        ("eval", "eval: {ppl: [gone.txt]}", ["line 6:", "unknown perplexity data 'gone.txt'",
                                             "the path of an existing text file"]),
        ("load", "load: {gguf_file: ../outside.gguf}", ["line 7:", "load.gguf_file '../outside.gguf' must be a file name inside the model folder"]),
        ("repair", "repair: {method: merge, merge_weight: .nan}",
         ["line 7:", "repair.merge_weight of merge must be a finite number, got nan"]),
    ],
    ids=["missing model", "missing calibration file", "zero samples", "unknown metric", "malformed remove",
         "remove all layers", "remove over 100%", "metric not scored", "unknown strategy", "unknown heal method",
         "missing heal data", "train_layers over the pruned model", "zero heal steps", "missing prompts file",
         "self-generated without prompts", "eval measures nothing",
         "missing eval file", "gguf file outside the model folder", "repair option not a number"],
)
def test_bad_stage_values_are_refused_before_the_run_starts(
    section: str, line: str, fragments: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Values a stage would refuse only when it starts (after the earlier stages ran) are refused by
    the preflight: exit 2, one line naming the line, the problem and the fix, no run folder, and no
    weights read (the layer count comes from config.json)."""
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny", "llama", 6)
    write_corpus(tmp_path / "corpus.txt")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded although the recipe could be refused before")

    monkeypatch.setattr("layerprune.models.loading.AutoModelForCausalLM.from_pretrained", refuse)
    path = _write(tmp_path, "\n".join({**PREFLIGHT_RECIPE, section: line}.values()) + "\n")
    capsys.readouterr()  # the checkpoint's own progress bar
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    for fragment in fragments:
        assert fragment in error[0], (fragment, error[0])
    assert not (tmp_path / "out").exists()


def test_checks_that_need_the_layer_count_wait_for_a_model_without_a_local_config(tmp_path: Path) -> None:
    """A hub id's config.json would cost a download, so the preflight leaves the out-of-range check
    to the stage (which reads the config anyway) but still refuses what needs no layer count."""
    recipe = load_recipe(_write(tmp_path, "model: some-org/not-downloaded\nscore: {metrics: [bi]}\n"
                                          "select: {remove: 99}\n"))
    runner.preflight(recipe, tmp_path / "out")
    recipe.sections["select"]["remove"] = "0%"
    with pytest.raises(UsageError, match="line 3: select.remove 0% must be more than 0"):
        runner.preflight(recipe, tmp_path / "out")


def test_run_json_is_a_versioned_record_and_one_written_before_format_version_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.json is checked against RunDocument when saved, and its shipped schema (package and docs)
    is the model's; a run.json as the code before format_version wrote it (fingerprint and stages
    only) still resumes, and one from a newer layerprune is refused."""
    name = schema_file(RunDocument)
    assert (SCHEMA_DIR / name).read_text() == schema_text(RunDocument)
    assert (Path(__file__).parents[2] / "docs" / "schemas" / name).read_text() == schema_text(RunDocument)
    schema = json.loads((SCHEMA_DIR / name).read_text())
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny", "llama", 6)
    write_corpus(tmp_path / "corpus.txt")
    recipe = _write(tmp_path, """\
        model: tiny
        calibration: {source: corpus.txt, samples: 8, seq_len: 32}
        score: {metrics: [bi], batch_size: 4}
        select: {remove: 2}
        """)
    out = run_recipe(recipe, tmp_path / "run", log=lambda _: None)
    state = json.loads((out / "run.json").read_text())
    jsonschema.validate(state, schema)
    assert state["format_version"] == newest_version(RunDocument) and list(state["stages"]) == ["score", "prune"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**state, "stages": {"score": {"remove": [1, 2]}}}, schema)  # a stage without seconds
    older = {"recipe_fingerprint": state["recipe_fingerprint"], "stages": {"score": state["stages"]["score"]}}
    (out / "run.json").write_text(json.dumps(older))
    messages: list[str] = []
    run_recipe(recipe, out, resume=True, log=messages.append)
    assert "[score] already done, skipping" in messages and "[prune] running" in messages
    resumed = json.loads((out / "run.json").read_text())
    jsonschema.validate(resumed, schema)
    assert resumed["stages"]["score"] == state["stages"]["score"] and "prune" in resumed["stages"]
    (out / "run.json").write_text(json.dumps({**resumed, "format_version": resumed["format_version"] + 1}))
    with pytest.raises(UsageError, match="newer than this layerprune reads"):
        run_recipe(recipe, out, resume=True, log=lambda _: None)
