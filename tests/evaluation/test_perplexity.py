"""Perplexity by non-overlapping windows, against a hand computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from layerprune.data import token_stream
from layerprune.errors import UsageError
from layerprune.evaluation.perplexity import dataset_perplexity, perplexity, resolve_ppl_source
from layerprune.models.tiny import byte_tokenizer, tiny_model
from tests.helpers import bos_tokenizer


def _hand_nll(model: torch.nn.Module, stream: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Token by token: -log p(x_t | x_window_start..t-1), summed over every window."""
    total, count = 0.0, 0
    for start in range(0, len(stream), seq_len):
        window = stream[start:start + seq_len]
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        for t in range(1, len(window)):
            total -= torch.log_softmax(logits[t - 1].double(), -1)[window[t]].item()
            count += 1
    return total / count, count


# trailing window of 7 tokens, none, and of 1 token (nothing to predict in it)
@pytest.mark.parametrize(("length", "tokens"), [(23, 7 + 7 + 6), (24, 7 + 7 + 7), (17, 7 + 7)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_hand_computation(length: int, tokens: int, batch_size: int) -> None:
    model = tiny_model("llama", 2)
    stream = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length))
    expected_nll, expected_tokens = _hand_nll(model, stream, 8)
    result = perplexity(model, stream, 8, batch_size=batch_size)
    assert result.tokens == expected_tokens == tokens
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-5)


def test_windows_do_not_see_the_previous_window() -> None:
    """Changing a token of the first window must not change the second window's contribution."""
    model = tiny_model("llama", 2)
    stream = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(0))
    changed = stream.clone()
    changed[3] = (changed[3] + 1) % 256
    second = perplexity(model, stream[8:], 8)
    both, both_changed = perplexity(model, stream, 8), perplexity(model, changed, 8)
    first, first_changed = perplexity(model, stream[:8], 8), perplexity(model, changed[:8], 8)
    assert both.nll * 14 == pytest.approx(first.nll * 7 + second.nll * 7, rel=1e-6)
    assert both_changed.nll * 14 - first_changed.nll * 7 == pytest.approx(second.nll * 7, rel=1e-6)


def test_a_start_token_opens_every_window_and_every_text_token_is_predicted() -> None:
    """With Gemma's <bos>-first protocol a window holds 1 start token + 7 text tokens, and each of
    the 7 is predicted: 21 tokens give 3 windows and 21 predictions (without it, 18 of 21)."""
    model = tiny_model("llama", 2)
    stream = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(2))
    total = 0.0
    for start in range(0, 21, 7):
        window = torch.cat([torch.tensor([257]), stream[start:start + 7]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), -1)
        total -= sum(log_probs[t - 1, window[t]].item() for t in range(1, 8))
    result = perplexity(model, stream, 8, prefix=[257])
    assert result.tokens == 21 and perplexity(model, stream, 8).tokens == 18
    assert result.nll == pytest.approx(total / 21, rel=1e-5)
    with pytest.raises(UsageError, match="no room for text"):
        perplexity(model, stream, 2, prefix=[257, 257])


def test_dataset_perplexity_follows_the_tokenizer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("a few words of text to score " * 3)
    model = tiny_model("llama", 2)
    plain = dataset_perplexity(model, byte_tokenizer(), str(text), 16)
    with_start = dataset_perplexity(model, bos_tokenizer(), str(text), 16)
    length = token_stream(byte_tokenizer(), str(text), split="test").numel()
    assert length > 3 * 16 and length % 16 > 1
    assert plain.tokens == length - math.ceil(length / 16)  # the first token of each window is not predicted
    assert with_start.tokens == length  # every text token is, after the start token
    assert with_start.nll != pytest.approx(plain.nll)


def test_max_windows_scores_only_the_first_windows() -> None:
    model = tiny_model("llama", 2)
    stream = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, stream, 8, max_windows=2) == perplexity(model, stream[:16], 8)


def test_bad_input_is_a_usage_error(tmp_path) -> None:
    model = tiny_model("llama", 2)
    with pytest.raises(UsageError, match="seq_len"):
        perplexity(model, torch.arange(10), 1)
    with pytest.raises(UsageError, match="fewer than 2 tokens"):
        perplexity(model, torch.arange(1), 8)
    with pytest.raises(UsageError, match="wiki-sample"):
        resolve_ppl_source("no-such-data")
    text = tmp_path / "text.txt"
    text.write_text("hello")
    assert resolve_ppl_source(str(text)).source == str(text)
