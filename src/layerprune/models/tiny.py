"""Tiny random models of every supported family, built from a config in code.

They make unit tests and fuzzing fast and need no download. The byte-level tokenizer covers all
256 bytes, so any text round-trips through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers import (
    Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig,
    Phi3Config, Qwen2Config, Qwen3Config,
)

TINY_VOCAB = 260  # 256 bytes + <pad> <bos> <eos> <unk>
_COMMON = dict(vocab_size=TINY_VOCAB, pad_token_id=256, bos_token_id=257, eos_token_id=258)
_LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, **_COMMON)


def _gemma3(n: int) -> PretrainedConfig:
    kinds = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(n)]
    return Gemma3TextConfig(**_LLAMA_SHAPE, head_dim=8, num_hidden_layers=n, layer_types=kinds, sliding_window=4)


TINY_CONFIGS: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": lambda n: LlamaConfig(**_LLAMA_SHAPE, num_hidden_layers=n),
    "mistral": lambda n: MistralConfig(**_LLAMA_SHAPE, num_hidden_layers=n, sliding_window=8),
    "qwen2": lambda n: Qwen2Config(**_LLAMA_SHAPE, num_hidden_layers=n),
    "qwen3": lambda n: Qwen3Config(**_LLAMA_SHAPE, head_dim=8, num_hidden_layers=n),
    "gemma2": lambda n: Gemma2Config(**_LLAMA_SHAPE, head_dim=8, num_hidden_layers=n, sliding_window=4),
    "gemma3": _gemma3,
    "phi3": lambda n: Phi3Config(**_LLAMA_SHAPE, num_hidden_layers=n),
    "gpt2": lambda n: GPT2Config(n_embd=32, n_layer=n, n_head=4, n_positions=256, **_COMMON),
    "opt": lambda n: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=n, num_attention_heads=4,
                               max_position_embeddings=256, word_embed_proj_dim=32, **_COMMON),
    "gpt_neox": lambda n: GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                        num_attention_heads=4, max_position_embeddings=256, **_COMMON),
}


def tiny_model(family: str, num_layers: int = 6, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised float32 model of ``family`` with ``num_layers`` decoder layers."""
    config = TINY_CONFIGS[family](num_layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_norm_weights(model, seed)
    return model.eval()


def _spread_norm_weights(model: PreTrainedModel, seed: int) -> None:
    """Random init leaves norms at exactly 1 (or 0 for Gemma); jitter them so bugs that mix up
    layers or norms cannot hide behind identical weights."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
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
