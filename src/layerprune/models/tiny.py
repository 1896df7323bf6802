"""Tiny random models of every supported family, built from the configs in the family files.

They make unit tests and fuzzing fast and need no download. Each family file's ``tiny`` section
names its test models and their config fields (``layerprune/models/families/*.yaml``), so a new family
file brings its tiny models, and the tests that run over :data:`TINY_FAMILIES` cover it. The
byte-level tokenizer covers all 256 bytes, so any text round-trips through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from layerprune.models.architectures import FAMILIES, ArchitectureAdapter

TINY_VOCAB = 260  # 256 bytes + <pad> <bos> <eos> <unk>
_TOKEN_IDS = dict(vocab_size=TINY_VOCAB, pad_token_id=256, bos_token_id=257, eos_token_id=258)

_TINY: dict[str, tuple[Mapping[str, Any], ArchitectureAdapter]] = {
    name: (fields, definition.adapter) for definition in FAMILIES for name, fields in definition.tiny.items()
}
TINY_FAMILIES: tuple[str, ...] = tuple(sorted(_TINY))


def tiny_config(family: str, num_layers: int) -> PretrainedConfig:
    """The config of the tiny ``family`` test model with ``num_layers`` decoder layers.

    ``layer_pattern`` in the family file lists per-layer config entries that repeat over the
    layers (Gemma-3's five sliding layers per full one, here two per one).
    """
    if family not in _TINY:
        raise KeyError(f"no tiny model {family!r}; the family files define: {', '.join(TINY_FAMILIES)}")
    fields = dict(_TINY[family][0])
    model_type = fields.pop("model_type")
    for name, pattern in fields.pop("layer_pattern", {}).items():
        fields[name] = [pattern[i % len(pattern)] for i in range(num_layers)]
    return AutoConfig.for_model(model_type, **fields, **_TOKEN_IDS, num_hidden_layers=num_layers)


def tiny_model(family: str, num_layers: int = 6, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised float32 model of ``family`` with ``num_layers`` decoder layers."""
    config = tiny_config(family, num_layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_norm_weights(model, _TINY[family][1], seed)
    return model.eval()


def _spread_norm_weights(model: PreTrainedModel, adapter: ArchitectureAdapter, seed: int) -> None:
    """Random init leaves norms at exactly 1 (or 0 for Gemma); jitter them so bugs that mix up
    layers or norms cannot hide behind identical weights. Norms are found by name, plus the
    weights of the family's declared per-layer norms whose names do not say so (GPT-2's ``ln_1``)."""
    declared = {f".{norm}.weight" for norm in (adapter.input_norm, adapter.pre_mlp_norm,
                                               adapter.post_attention_norm, adapter.post_mlp_norm) if norm}
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(tuple(declared)):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose ids match the tiny models' vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258, "<unk>": 259})
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=1))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
