"""Scoring's head is the model's own: ``Head`` on the last layer's output gives ``model(...).logits``.

``ppl``, ``taylor`` and streaming turn hidden states into logits through :class:`Head`, which runs
the modules and logit steps the family file declares. If a family file forgot a step (Cohere's
``logit_scale``, Granite's ``logits_scaling``, Gemma-2's soft-capping) or a module (OPT's
``project_out``), these tests fail for that family.
"""

from __future__ import annotations

import copy

import pytest
import torch

from layerprune.models.architectures import FAMILIES as FAMILY_FILES
from layerprune.models.architectures import adapter_for, parse_family, register_families
from layerprune.scoring.forward import Head, run_decoder
from tests.conftest import FAMILIES
from tests.helpers import tiny_loaded


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def _last_layer_output(loaded, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last decoder layer's own output, the model's logits) from one forward pass."""
    captured = []
    last = loaded.adapter.decoder_layers(loaded.model)[-1]
    handle = last.register_forward_hook(lambda module, args, output: captured.append(
        output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    return captured[0], logits


@pytest.mark.parametrize("family", FAMILIES)
def test_head_on_the_last_layer_output_equals_the_models_logits(family: str) -> None:
    loaded = tiny_loaded(family, num_layers=3, dtype=torch.float64)
    ids, mask = _ids()
    hidden, expected = _last_layer_output(loaded, ids, mask)
    head = Head(loaded)
    with torch.no_grad():
        torch.testing.assert_close(head.logits(hidden), expected, rtol=1e-12, atol=1e-12)
        normed = run_decoder(loaded, ids, mask)  # after the final norm and head projection
        torch.testing.assert_close(head.logits(normed, normed=True), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["cohere", "gemma2", "granite"])
def test_the_declared_logit_steps_matter(family: str) -> None:
    """Without its logit steps the head would be wrong, so the test above has teeth for these families."""
    loaded = tiny_loaded(family, num_layers=3, dtype=torch.float64)
    ids, mask = _ids()
    with torch.no_grad():
        plain = loaded.model.get_output_embeddings()(run_decoder(loaded, ids, mask))
        assert not torch.allclose(plain, loaded.model(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


def test_the_new_families_are_data_whose_head_differs_from_llamas() -> None:
    """Cohere (logit_scale, parallel LayerNorm layers) and Granite (logits_scaling) come from their files alone."""
    by_family = {definition.adapter.family: definition.adapter for definition in FAMILY_FILES}
    assert [step.config_field for step in by_family["cohere"].logit_scaling] == ["logit_scale"]
    assert by_family["cohere"].parallel_residual and by_family["cohere"].norm_kind == "layer"
    assert [(s.op, s.config_field) for s in by_family["granite"].logit_scaling] == [("divide", "logits_scaling")]
    assert {"cohere", "granite", "opt_post_norm"} <= set(FAMILIES)


def test_every_family_file_brings_a_tiny_model_so_the_family_tests_cover_it() -> None:
    assert all(definition.tiny for definition in FAMILY_FILES)
    assert {name for definition in FAMILY_FILES for name in definition.tiny} == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_layer_parts_exist_and_the_norm_kind_is_what_the_norms_compute(family: str) -> None:
    """The paths that repair folds weights into point at real modules, and ``norm_kind`` says how they
    normalise: a LayerNorm ignores a constant shift of its input, an RMS norm does not; with its weight
    at zero a plain RMS norm outputs zeros, Gemma's ``(1 + w)`` norm the normalised input."""
    loaded = tiny_loaded(family, num_layers=2, dtype=torch.float64)
    adapter = loaded.adapter
    layer = adapter.decoder_layers(loaded.model)[0]
    for path in (*adapter.attention_outputs, adapter.mlp_output):
        assert layer.get_submodule(path).weight.dim() == 2, path
    paths = [adapter.input_norm, adapter.pre_mlp_norm, adapter.post_attention_norm, adapter.post_mlp_norm]
    norms = [copy.deepcopy(layer.get_submodule(path)) for path in paths if path]
    x = torch.randn(3, norms[0].weight.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for norm in norms:
            assert torch.allclose(norm(x + 3.0), norm(x), atol=1e-5) == (adapter.norm_kind == "layer")
            for parameter in norm.parameters():
                parameter.zero_()
            assert bool(norm(x).abs().max() > 0.1) == (adapter.norm_kind == "rms_one_plus")


def test_config_flags_are_read_per_checkpoint() -> None:
    assert adapter_for(tiny_loaded("opt_post_norm", num_layers=1).model).post_norm
    assert not adapter_for(tiny_loaded("opt", num_layers=1).model).post_norm
    neox = tiny_loaded("gpt_neox", num_layers=1).model
    assert adapter_for(neox).parallel_residual
    neox.config.use_parallel_residual = False
    assert not adapter_for(neox).parallel_residual


@pytest.mark.parametrize(("data", "message"), [
    ({"family": "x", "model_types": ["x"], "layers": "m.l", "embeddings": "m.e"}, r"missing keys \['final_norm'\]"),
    ({"family": "x", "model_types": ["x"], "layers": "m.l", "embeddings": "m.e", "final_norm": "m.n",
      "lm_hed": "h"}, r"unknown keys \['lm_hed'\]"),
    ({"family": "x", "model_types": ["x"], "layers": "m.l", "embeddings": "m.e", "final_norm": "m.n",
      "norm_kind": "batch"}, "norm_kind must be one of"),
    ({"family": "x", "model_types": ["x"], "layers": "m.l", "embeddings": "m.e", "final_norm": "m.n",
      "logit_scaling": [{"scale": "logit_scale"}]}, "logit_scaling step"),
    ({"family": "x", "model_types": ["x"], "layers": "m.l", "embeddings": "m.e", "final_norm": "m.n",
      "post_norm": "yes"}, "post_norm must be"),
])
def test_a_broken_family_file_is_refused_naming_the_file_and_key(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_family(data, "broken.yaml")
    assert "broken.yaml" in str(error.value)


def test_a_model_type_claimed_by_two_family_files_is_refused() -> None:
    with pytest.raises(ValueError, match=r"family file llama.yaml: model type 'llama' is already covered"):
        register_families(FAMILY_FILES + tuple(d for d in FAMILY_FILES if d.source == "llama.yaml"))
