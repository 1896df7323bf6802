"""Property-based tests: surgery invariants over random layer sets and random tiny configs of
every supported family, and a fuzz run over ``prune``/``info`` arguments that must end in a result
or a clean error, never a traceback.

``LAYERPRUNE_FUZZ_EXAMPLES`` raises the number of cases (the default keeps the suite fast).
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, PreTrainedModel

from layerprune.models.architectures import adapter_for
from layerprune.models.surgery import remove_layers
from layerprune.models.tiny import TINY_CONFIGS
from tests.conftest import FAMILIES
from tests.helpers import skipping_layers
from tests.reliability.conftest import CliResult, assert_refused

EXAMPLES = int(os.environ.get("LAYERPRUNE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def tiny_configs(draw: st.DrawFn) -> tuple[str, PreTrainedModel]:
    """A random small model: family, depth 2-8, heads, head size, KV groups and FFN width."""
    family = draw(st.sampled_from(FAMILIES))
    num_layers = draw(st.integers(2, 8))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    config = TINY_CONFIGS[family](num_layers)
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
    "--out": ["OUT", "MODEL", "MODEL/inside", "EXISTING", "A_FILE"],
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
