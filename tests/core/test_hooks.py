"""The submodule hooks: what they capture is what transformers itself reports, and a stopped
forward really stops."""

from __future__ import annotations

import pytest
import torch

from layerprune.models.architectures import adapter_for
from layerprune.models.hooks import StopForward, capture_io, layer_input, layer_output, until_stopped
from layerprune.models.tiny import tiny_model

FAMILIES = ["llama", "gemma3", "gpt2", "opt", "gpt_neox"]


def _calls_of(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_io_matches_the_hidden_states_and_stops_after_the_block(family: str) -> None:
    model = tiny_model(family, 6)
    layers = adapter_for(model).decoder_layers(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states  # [i]: input of layer i
    after_block = _calls_of(layers[4])
    with torch.no_grad(), capture_io(layers[1], layers[3]) as captured:
        model(input_ids=ids)
    assert captured.input is not None and captured.output is not None
    torch.testing.assert_close(captured.input, reference[1], rtol=0, atol=0)
    torch.testing.assert_close(captured.output, reference[4], rtol=0, atol=0)
    assert after_block == [], "the forward went on past the block"
    assert captured.kwargs, "the layer's other arguments (masks, positions) were not recorded"


def test_capture_io_without_stop_lets_the_forward_finish() -> None:
    model = tiny_model("llama", 4)
    layers = adapter_for(model).decoder_layers(model)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with capture_io(layers[0], layers[1], stop=False) as captured:
            logits = model(input_ids=ids).logits
    assert captured.output is not None
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers), "hooks left behind"


def test_until_stopped_swallows_only_stop_forward() -> None:
    with until_stopped():
        raise StopForward
    with pytest.raises(ValueError), until_stopped():
        raise ValueError("a real error must surface")


def test_layer_input_and_output_read_either_calling_convention() -> None:
    hidden, other = torch.ones(2), torch.zeros(2)
    assert layer_input((hidden,), {}) is hidden
    assert layer_input((), {"hidden_states": hidden}) is hidden
    assert layer_output((hidden, other)) is hidden
    assert layer_output(hidden) is hidden
