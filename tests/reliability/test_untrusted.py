"""Untrusted files: no remote code and no unpickling unless asked, YAML through the safe loader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.errors import UsageError
from layerprune.recipes import yamlfile
from layerprune.models.tiny import TINY_FAMILIES, tiny_config
from tests.reliability.conftest import TINY_LAYERS, CliResult, assert_refused, snapshot

Cli = Callable[..., CliResult]


def test_pickle_weights_are_refused_without_allow_pickle(pickle_dir: Path, cli: Cli, tmp_path: Path,
                                                         no_weight_loading: None) -> None:
    before = snapshot(pickle_dir)
    assert_refused(cli("info", "--model", pickle_dir), "pickle", "--allow-pickle")
    assert_refused(cli("prune", "--model", pickle_dir, "--layers", "1", "--out", tmp_path / "out"), "--allow-pickle")
    assert snapshot(pickle_dir) == before and list(tmp_path.iterdir()) == []


def test_pickle_weights_load_with_allow_pickle(pickle_dir: Path, cli: Cli, tmp_path: Path) -> None:
    loaded = lp.load_model(pickle_dir, allow_pickle=True)
    expected = torch.load(pickle_dir / "pytorch_model.bin", weights_only=True)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    result = cli("prune", "--model", pickle_dir, "--allow-pickle", "--layers", "0", "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert sorted(p.suffix for p in (tmp_path / "out").glob("model*")) == [".safetensors"], "exported safely"


def test_remote_code_is_never_run_unless_asked(remote_code_dir: tuple[Path, Path], cli: Cli, tmp_path: Path) -> None:
    folder, marker = remote_code_dir
    assert_refused(cli("info", "--model", folder), "custom code", "--trust-remote-code")
    assert_refused(cli("prune", "--model", folder, "--layers", "1", "--out", tmp_path / "out"), "--trust-remote-code")
    with pytest.raises(UsageError, match="custom code"):
        lp.load_model(folder)
    assert not marker.exists(), "the repository's Python file was imported"
    assert not (tmp_path / "out").exists()


def test_remote_code_runs_when_asked(remote_code_dir: tuple[Path, Path], cli: Cli) -> None:
    """The refusal above is the flag's doing: with it, the same folder's code runs (and loads)."""
    folder, marker = remote_code_dir
    result = cli("info", "--model", folder, "--trust-remote-code", "--json")
    assert marker.read_text() == "ran"
    assert result.code == 0, result.stderr
    assert f'"num_layers": {TINY_LAYERS}' in result.stdout


@pytest.mark.parametrize("opt_in", ["trust_remote_code", "allow_pickle"])
def test_a_recipe_cannot_grant_itself_the_right_to_run_code(remote_code_dir: tuple[Path, Path], cli: Cli,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            opt_in: str) -> None:
    """A downloaded folder: a model whose config names its own Python, and a recipe beside it that asks for
    the right to run it. Only the flag of the person running the recipe grants that."""
    folder, marker = remote_code_dir
    (folder / "recipe.yaml").write_text(f"model: .\nload:\n  {opt_in}: true\nscore: {{metrics: [magnitude-l1]}}\n")
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    assert_refused(cli("run", "recipe.yaml", "--out", tmp_path / "run"), "recipe.yaml line 3", opt_in,
                   "--" + opt_in.replace("_", "-"))
    with pytest.raises(UsageError, match=f"asks for {opt_in}"):
        lp.run_recipe(folder / "recipe.yaml", tmp_path / "run")
    assert not marker.exists(), "the folder's Python file was imported"
    assert snapshot(folder) == before and not (tmp_path / "run").exists()
    if opt_in == "trust_remote_code":  # granted by the person running it, the same recipe runs the model's code
        result = cli("run", "recipe.yaml", "--out", tmp_path / "run", "--trust-remote-code")
        assert result.code == 0, result.stderr
        assert marker.read_text() == "ran"


def test_yaml_is_read_with_the_safe_loader(tmp_path: Path) -> None:
    yamlfile = pytest.importorskip("layerprune.recipes.yamlfile")
    marker = tmp_path / "yaml-ran-code"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UsageError, match="line 1"):
        yamlfile.read_yaml(recipe)
    assert not marker.exists()


def test_every_tiny_family_is_registered_so_fuzzing_covers_all() -> None:
    from layerprune.models.architectures import ADAPTERS

    assert all(tiny_config(f, 2).model_type in ADAPTERS for f in TINY_FAMILIES)


@pytest.mark.parametrize("name", ["../outside.gguf", "sub/model.gguf", "..", "/etc/model.gguf"])
def test_a_gguf_file_name_cannot_leave_the_model_folder(tmp_path: Path, cli: Cli, name: str) -> None:
    """``--gguf-file`` names a file inside ``--model``; a path would read from elsewhere."""
    (tmp_path / "models").mkdir()
    (tmp_path / "outside.gguf").write_bytes(b"GGUF")
    assert_refused(cli("info", "--model", tmp_path / "models", "--gguf-file", name),
                   "--gguf-file", "must be a file name inside the model folder")


@pytest.mark.parametrize("layers", [TINY_LAYERS + 2, TINY_LAYERS - 1])
def test_a_config_that_disagrees_with_its_weights_is_refused(tmp_path: Path, cli: Cli, layers: int) -> None:
    """More layers in config.json than in the weights would load random layers; fewer would drop
    weights. Both are refused, on the in-memory path as on shard surgery."""
    import json

    from tests.helpers import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "model", "llama", TINY_LAYERS)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    before = snapshot(folder)
    kind = "missing" if layers > TINY_LAYERS else "unexpected"
    assert_refused(cli("info", "--model", folder), f"config.json ({layers} layers) does not match its weight files",
                   kind)
    # prune cuts a local safetensors checkpoint on its files (shard surgery), which reads the layer
    # indices from the tensor names and refuses with its own words
    assert_refused(cli("prune", "--model", folder, "--layers", "0", "--out", tmp_path / "out"), "config.json",
                   f"says {layers} layers", "weight files")
    assert_refused(cli("prune", "--model", folder, "--layers", "0", "--generate", "hi", "--out", tmp_path / "out"),
                   kind)
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


def billion_laughs(levels: int) -> str:
    """A recipe whose aliases expand to 9**levels values from a few hundred bytes of text."""
    lines = ["model: m", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join([*lines, f"score: {{metrics: *l{levels - 1}}}"]) + "\n"


@pytest.mark.parametrize(("text", "message"), [
    (billion_laughs(9), "expands to more than"),
    ("model: m\nscore: &s {metrics: [bi], again: *s}\n", "refers to itself"),
    ("model: m\nscore: " + "[" * 60 + "]" * 60 + "\n", "nests deeper"),
])
def test_a_yaml_expansion_bomb_is_refused_before_it_is_built(text: str, message: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused from the composed node graph: nothing is constructed from the document (a construction
    of the bomb would take minutes and gigabytes)."""
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(text)

    def never(*_: object, **__: object) -> None:
        raise AssertionError("the document was built before its size was checked")

    monkeypatch.setattr(yamlfile.yaml, "safe_load", never)
    with pytest.raises(UsageError, match=message):
        yamlfile.read_yaml(recipe)


def test_a_recipe_far_larger_than_any_recipe_is_refused_unread(tmp_path: Path) -> None:
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("model: m\n" + "# padding\n" * 200_000)
    with pytest.raises(UsageError, match="more than a recipe can need"):
        yamlfile.read_yaml(recipe)
