"""Property-based tests: surgery invariants over random layer sets and random tiny configs of
every supported family, and fuzz runs over ``prune``/``info`` arguments and over recipe files for
``layerprune run`` that must end in a result or a clean error, never a traceback.

``LAYERPRUNE_FUZZ_EXAMPLES`` raises the number of cases (the default keeps the suite fast).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, PreTrainedModel

from layerprune.errors import UsageError
from layerprune.models.architectures import adapter_for
from layerprune.models.surgery import remove_layers
from layerprune.models.tiny import tiny_config
from layerprune.outputs import NOT_OURS
from tests.conftest import FAMILIES
from tests.helpers import record_text, skipping_layers, write_corpus
from tests.reliability.conftest import CliResult, assert_refused, snapshot

EXAMPLES = int(os.environ.get("LAYERPRUNE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def tiny_configs(draw: st.DrawFn) -> tuple[str, PreTrainedModel]:
    """A random small model: family, depth 2-8, heads, head size, KV groups and FFN width."""
    family = draw(st.sampled_from(FAMILIES))
    num_layers = draw(st.integers(2, 8))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    config = tiny_config(family, num_layers)
    config.hidden_size = heads * head_dim
    config.num_attention_heads = heads
    for name, value in (("num_key_value_heads", draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))),
                        ("head_dim", head_dim), ("intermediate_size", draw(st.sampled_from([16, 48]))),
                        ("ffn_dim", 48), ("word_embed_proj_dim", heads * head_dim)):
        if hasattr(config, name) and getattr(config, name) is not None:
            setattr(config, name, value)
    config._attn_implementation = "eager"
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at exactly 1 or 0: jitter them so mixed-up layers show
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return family, model


@FUZZ
@given(data=st.data(), case=tiny_configs())
def test_surgery_invariants_hold_for_random_models_and_layer_sets(data: st.DataObject,
                                                                  case: tuple[str, PreTrainedModel]) -> None:
    family, original = case
    depth = adapter_for(original).num_layers(original)
    removed = data.draw(st.sets(st.integers(0, depth - 1), min_size=1, max_size=depth - 1), label="removed")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(len(removed)))
    with torch.no_grad(), skipping_layers(adapter_for(original).decoder_layers(original), removed):
        expected = original(ids).logits
    layer_types = getattr(original.config, "layer_types", None)
    pruned = copy.deepcopy(original)
    assert remove_layers(pruned, list(removed)) == sorted(removed)
    kept = [i for i in range(depth) if i not in removed]
    layers = adapter_for(pruned).decoder_layers(pruned)
    assert len(layers) == pruned.config.num_hidden_layers == len(kept)
    for new_index, layer in enumerate(layers):
        assert {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")} <= {new_index}
    if isinstance(layer_types, list):
        assert pruned.config.layer_types == [layer_types[i] for i in kept]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, rtol=1e-5, atol=1e-5)


FLAG_VALUES: dict[str, list[str | None]] = {
    "--layers": ["1", "0,2", "1-2", "0-3", "0-9", "-1", "1,1", "", "x", "3-1", "2-", " , ", "99999999999999999999"],
    "--dtype": ["float32", "bf16", "float16", "auto", "int8", ""],
    "--device": ["cpu", "auto", "cuda:7", "tpu", ""],
    "--out": ["OUT", "MODEL", "MODEL/inside", "MODEL/..", "EXISTING", "EXISTING/sub", "A_FILE", "A_FILE/sub", "",
              "/", ".", "~"],
    "--max-new-tokens": ["1", "0", "-3", "two"],
    "--generate": ["hi", ""],
    "--gguf-file": ["nope.gguf"],
    "--model": ["MODEL", "missing", "A_FILE", "EXISTING"],
    "--overwrite": [None], "--allow-pickle": [None], "--trust-remote-code": [None], "--json": [None],
    "--bogus": [None], "-v": [None],
}


@FUZZ
@given(command=st.sampled_from(["prune", "info"]),
       flags=st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=6),
       choices=st.lists(st.integers(0, 100), min_size=6, max_size=6))
def test_cli_arguments_end_in_a_result_or_a_clean_error(command: str, flags: list[str], choices: list[int],
                                                        cli: Callable[..., CliResult], tiny_dir: Path,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("fuzz")
    (work / "EXISTING").mkdir()
    (work / "A_FILE").write_text("x")
    places = {"MODEL": str(tiny_dir), "OUT": str(work / "out"), "EXISTING": str(work / "EXISTING"),
              "A_FILE": str(work / "A_FILE"), "missing": str(work / "missing")}
    argv = [command, "--model", str(tiny_dir)]
    for flag, choice in zip(flags, itertools.cycle(choices)):
        values = FLAG_VALUES[flag]
        value = values[choice % len(values)]
        argv += [flag] if value is None else [flag, places.get(value.split("/")[0], value) + value[len(value.split("/")[0]):]]
    model_before = sorted(p.name for p in tiny_dir.iterdir())
    result = cli(*argv)
    assert result.code in (0, 2), (argv, result.code, result.stderr)
    if result.code == 2:
        assert_refused(result)
    assert sorted(p.name for p in tiny_dir.iterdir()) == model_before, argv
    if result.code == 0 and command == "prune" and "--help" not in argv:
        out = Path(argv[len(argv) - 1 - argv[::-1].index("--out") + 1])
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers >= 1


# Recipe fuzzing: documents built from a valid tiny recipe by random edits (misspelled, unknown or
# missing keys, wrong types, bad values, odd paths, random YAML structures), plus raw random text.
# Keys that reach the network or run for long (lm-eval tasks, classification, efficiency timing)
# are left out: their validation is the same schema code as every other key's.
RECIPE_EXAMPLES = 5 * EXAMPLES
RECIPE_FUZZ = settings(max_examples=RECIPE_EXAMPLES, deadline=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SECTION_KEYS = {
    "load": ["dtype", "device", "trust_remote_code", "allow_pickle", "gguf_file"],
    "calibration": ["source", "split", "samples", "seq_len", "seed", "sampling", "text_field"],
    "score": ["metrics", "batch_size", "positions", "seed"],
    "select": ["remove", "strategy", "metric"],
    "heal": ["method", "data", "original", "steps", "batch_size", "lr", "seq_len", "samples", "train_layers",
             "lora_rank", "distill", "distill_weight", "block", "checkpoint_every", "precision"],
    "eval": ["ppl", "seq_len", "max_windows", "batch_size"],
}
PLACES = ["CORPUS", "MISSING", "../outside.txt", "/etc/hostname", "~/x.txt", "MODEL", "dir/", "a b.txt", "é.txt"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.sampled_from([10**12, 2.5, -0.5, float("nan"), float("inf")]),
    st.sampled_from(["", "x", "25%", "120%", "0%", "-5%", "1e3", "bi", "angular", "taylor", "random", "consecutive",
                     "iterative", "partial-ft", "lora", "qlora", "replace-linear", "float16", "bf16", "cpu", "cuda",
                     "documents", "contiguous", "test", "last", "0-1", "yes", "~", "null", *PLACES]),
    st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _base_recipe() -> dict:
    """A valid recipe that runs every stage on the tiny model in about a second."""
    return {"model": "MODEL", "calibration": {"source": "CORPUS", "samples": 2, "seq_len": 8},
            "score": {"metrics": ["bi"], "batch_size": 2}, "select": {"remove": 1},
            "heal": {"method": "partial-ft", "data": "CORPUS", "steps": 1, "batch_size": 2, "seq_len": 8,
                     "train_layers": 1},
            "eval": {"ppl": ["CORPUS"], "seq_len": 8, "max_windows": 1}}


def _misspell(key: str, position: int) -> str:
    index = position % max(1, len(key))
    return key[:index] + key[index + 1:] if len(key) > 1 else key + "s"


@st.composite
def recipe_documents(draw: st.DrawFn) -> str:
    """YAML text: mostly edits of the base recipe, sometimes random structures or raw text."""
    kind = draw(st.sampled_from(["edits"] * 6 + ["structure", "text"]))
    if kind == "text":
        return draw(st.text(max_size=60))
    if kind == "structure":
        return yaml.safe_dump(draw(VALUES), allow_unicode=True)
    recipe = _base_recipe()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["", *SECTION_KEYS]))
        target = recipe if not section else recipe.get(section)
        if not isinstance(target, dict):
            continue
        keys = list(SECTION_KEYS[section]) if section else ["model", "name", "description", *SECTION_KEYS]
        edit = draw(st.sampled_from(["drop", "set", "misspell", "unknown", "replace-section"]))
        key = draw(st.sampled_from(keys))
        if edit == "drop":
            target.pop(key, None)
        elif edit == "set":
            target[key] = draw(VALUES)
        elif edit == "misspell" and key in target:
            target[_misspell(key, draw(st.integers(0, 20)))] = target.pop(key)
        elif edit == "unknown":
            target[draw(st.text(min_size=1, max_size=8))] = draw(SCALARS)
        elif section:
            recipe[section] = draw(VALUES)
    return yaml.safe_dump(recipe, allow_unicode=True)


@RECIPE_FUZZ
@given(document=recipe_documents(), out=st.sampled_from(["out", "MODEL", "MODEL/inside", "EXISTING", "A_FILE",
                                                         "odd name é/out"]),
       recipe_name=st.sampled_from(["recipe.yaml", "missing.yaml", "EXISTING", "binary.yaml"]))
def test_recipe_files_end_in_a_result_or_a_clean_error(document: str, out: str, recipe_name: str,
                                                       cli: Callable[..., CliResult], tiny_dir: Path,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("recipe-fuzz")
    (work / "EXISTING").mkdir()
    (work / "A_FILE").write_text("x")
    (work / "binary.yaml").write_bytes(b"\xff\xfe\x00model: \x80\n")
    corpus = write_corpus(work / "corpus.txt")
    places = {"MODEL": str(tiny_dir), "CORPUS": str(corpus), "MISSING": str(work / "missing.txt")}
    for name, path in places.items():
        document = document.replace(name, path)
    (work / "recipe.yaml").write_text(document)
    out_path = places.get(out.split("/")[0], str(work / out.split("/")[0])) + out[len(out.split("/")[0]):]
    model_before = snapshot(tiny_dir)
    result = cli("run", work / recipe_name, "--model", tiny_dir, "--out", out_path, "--allow-path", tiny_dir.parent)
    assert result.code in (0, 2), (document, result.code, result.stderr)
    event("finished" if result.code == 0 else re.sub(r"\S*/\S*|'.*?'|\d+", "_", result.stderr)[22:80])
    if result.code == 2:
        assert_refused(result)
    else:
        assert json.loads((Path(out_path) / "run.json").read_text())["stages"]
    assert snapshot(tiny_dir) == model_before, "nothing is written into the input model"


# Output-path and overwrite rules (issue 21): random folder trees with an input somewhere in
# them, and an output path drawn among the tree's places (the input itself, its parents, places
# inside it, siblings, files, `..` detours, symlinks, empty names). The rules decide from the
# resolved paths alone, so the expected outcome is computed independently here, from the tree.
TREE_NAMES = st.sampled_from(["a", "b", "in", "out", "é", "x y"])


@st.composite
def output_cases(draw: st.DrawFn) -> dict:
    depth = draw(st.integers(1, 3))
    input_parts = [draw(TREE_NAMES) for _ in range(depth)]
    kind = draw(st.sampled_from(["input", "parent", "inside", "sibling", "new", "detour", "symlink", "empty"]))
    state = draw(st.sampled_from(["missing", "empty folder", "layerprune folder", "user folder", "user file"]))
    extra = [draw(TREE_NAMES) for _ in range(draw(st.integers(1, 2)))]
    return {"input": input_parts, "kind": kind, "state": state, "extra": extra,
            "overwrite": draw(st.booleans()), "parent_up": draw(st.integers(1, depth))}


def _expected_refusal(target: Path, model: Path, existed: str, overwrite: bool) -> str | None:
    """What check_output_path must say, derived from the resolved paths and the target's state."""
    if target == model or model in target.parents or target in model.parents:
        return "input"
    if existed == "missing":
        return None
    if not overwrite:
        return "already exists"
    if existed == "user file":
        return "is not a folder"
    return NOT_OURS if existed == "user folder" else None


@FUZZ
@given(case=output_cases())
def test_output_folder_rules_hold_for_random_trees(case: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    from layerprune.outputs import check_output_path

    root = tmp_path_factory.mktemp("tree")
    model = root.joinpath(*case["input"])
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    target = {"input": model, "parent": model.parents[case["parent_up"] - 1], "inside": model.joinpath(*case["extra"]),
              "sibling": model.parent / ("sib-" + case["extra"][0]), "new": root / "new" / case["extra"][0],
              "detour": model.joinpath(*case["extra"], *[".."] * len(case["extra"])), "symlink": root / "link",
              "empty": None}[case["kind"]]
    if case["kind"] == "symlink":
        target.symlink_to(model)
    if target is None:
        with pytest.raises(UsageError, match="is empty"):
            check_output_path("", overwrite=case["overwrite"], protected=[model])
        return
    resolved = target.resolve()
    existed = case["state"] if not resolved.exists() else (
        "layerprune folder" if (resolved / "layerprune.json").exists() else "user folder")
    if not resolved.exists() and case["state"] != "missing":
        if case["state"] == "user file":
            resolved.parent.mkdir(parents=True, exist_ok=True)
            resolved.write_text("mine")
        else:
            resolved.mkdir(parents=True)
            if case["state"] == "layerprune folder":
                (resolved / "layerprune.json").write_text(record_text("layerprune-before-format-version.json"))
            elif case["state"] == "user folder":
                (resolved / "notes.txt").write_text("mine")
    before = snapshot(root)
    expected = _expected_refusal(resolved, model.resolve(), existed, case["overwrite"])
    if expected is None:
        assert check_output_path(target, overwrite=case["overwrite"], protected=[model]) == resolved
    else:
        with pytest.raises(UsageError, match=re.escape(expected)):
            check_output_path(target, overwrite=case["overwrite"], protected=[model])
    assert snapshot(root) == before, "a check writes nothing"


NUMBER_TEXTS = st.one_of(st.sampled_from(["nan", "NaN", "inf", "-inf", "+inf", "1e400", "-1e400", "0", "-0.0", "1e-4",
                                          "2", "-1", "1e-300", "infinity", "0x10", "", "one"]),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr))


@FUZZ
@given(text=NUMBER_TEXTS)
def test_float_options_accept_exactly_the_finite_numbers(text: str) -> None:
    """Every float option reads its flag with finite_float and checks its value as Option.check does:
    a learning rate is accepted exactly when it is a finite positive number."""
    import argparse

    from layerprune.healing.base import TrainingOptions
    from layerprune.options import build_options, finite_float

    try:
        expected = float(text)
    except ValueError:
        expected = None
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        assert expected is None or not math.isfinite(expected), text
    else:
        assert expected is not None and math.isfinite(expected) and value == expected, text
    if expected is None:
        return
    if math.isfinite(expected) and expected > 0:
        assert build_options(TrainingOptions, {"lr": expected}, unit="healing").lr == expected
    else:
        with pytest.raises(UsageError):
            build_options(TrainingOptions, {"lr": expected}, unit="healing")
