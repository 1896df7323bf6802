"""Architecture adapters: where each model family keeps its parts.

An adapter is data, not code: the dotted paths of the decoder-layer list, the embeddings, the
final norm and the LM head, the config fields that hold one entry per layer, the attention output
projection(s) inside a layer (zeroed to encode an FFN-only replacement layer) and the linear
modules LoRA should target. Adding a family is one ``register(...)`` call in this file.

Unknown families fall back to :func:`infer_adapter`, which finds the single ``ModuleList`` of
blocks and warns, so that users of new architectures are not stopped by a missing table entry.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from layerprune.errors import UsageError
from layerprune.registry import Registry


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one model family keeps the parts that layer surgery touches."""

    family: str
    layers: str
    embeddings: str
    final_norm: str
    lm_head: str = "lm_head"
    attention_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    per_layer_config: tuple[str, ...] = ("layer_types",)
    mlp_output: str = "mlp.down_proj"
    """The MLP's output projection inside a layer (a training-free repair folds its map into it)."""
    post_attention_norm: str | None = None
    """A norm applied to the attention output before it joins the residual (Gemma-2/3)."""
    post_mlp_norm: str | None = None
    """A norm applied to the MLP output before it joins the residual (Gemma-2/3)."""
    norm_kind: str = "rms"
    """``rms``, ``rms_one_plus`` (Gemma's norms scale by ``1 + weight``) or ``layer`` (LayerNorm)."""
    post_norm: bool = False
    """True when layers normalise the residual after adding to it (OPT-350m), so nothing reads the
    stream through a scale-invariant norm; decided from the config by :func:`adapter_for`."""
    inferred: bool = field(default=False, compare=False)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_decoder_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_path, _, name = self.layers.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))


ADAPTERS: Registry[ArchitectureAdapter] = Registry("architecture")


def register(model_types: tuple[str, ...], adapter: ArchitectureAdapter) -> None:
    for model_type in model_types:
        ADAPTERS.register(model_type)(adapter)


_LLAMA_LIKE = dict(layers="model.layers", embeddings="model.embed_tokens", final_norm="model.norm")
register(("llama",), ArchitectureAdapter("llama", **_LLAMA_LIKE))
register(("mistral",), ArchitectureAdapter("mistral", **_LLAMA_LIKE))
register(("qwen2",), ArchitectureAdapter("qwen2", **_LLAMA_LIKE))
register(("qwen3",), ArchitectureAdapter("qwen3", **_LLAMA_LIKE))
register(
    ("gemma2", "gemma3_text", "gemma3"),
    ArchitectureAdapter("gemma", **_LLAMA_LIKE, post_attention_norm="post_attention_layernorm",
                        post_mlp_norm="post_feedforward_layernorm", norm_kind="rms_one_plus"),
)
register(
    ("phi3",),
    ArchitectureAdapter("phi3", **_LLAMA_LIKE, lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
)
register(
    ("gpt2",),
    ArchitectureAdapter(
        "gpt2", layers="transformer.h", embeddings="transformer.wte", final_norm="transformer.ln_f",
        attention_outputs=("attn.c_proj",), lora_targets=("c_attn", "c_proj", "c_fc"), mlp_output="mlp.c_proj",
        norm_kind="layer",
    ),
)
register(
    ("opt",),
    ArchitectureAdapter(
        "opt", layers="model.decoder.layers", embeddings="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm", attention_outputs=("self_attn.out_proj",),
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), mlp_output="fc2", norm_kind="layer",
    ),
)
register(
    ("gpt_neox",),
    ArchitectureAdapter(
        "gpt_neox", layers="gpt_neox.layers", embeddings="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm", attention_outputs=("attention.dense",),
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        mlp_output="mlp.dense_4h_to_h", norm_kind="layer",
    ),
)


def supported_families() -> list[str]:
    return ADAPTERS.names()


_CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_ENCODER_ONLY = {"albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
                 "megatron-bert", "modernbert", "rembert", "roberta", "roberta-prelayernorm", "xlm-roberta", "xmod"}


def check_supported_config(config: PretrainedConfig) -> None:
    """Fail before loading weights if the checkpoint is not a decoder-only causal LM."""
    model_type = config.model_type
    if model_type in ADAPTERS or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return  # a registered family, or custom code (already trusted by the user) that declares a causal LM
    architectures = getattr(config, "architectures", None) or []
    declared_non_causal = architectures and not any(a.endswith(_CAUSAL_CLASS_SUFFIXES) for a in architectures)
    if (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or getattr(config, "is_encoder_decoder", False)
        or declared_non_causal
        or (model_type in _ENCODER_ONLY and not getattr(config, "is_decoder", False))
    ):
        raise UsageError(
            f"architecture {model_type!r} is not a causal (decoder-only) language model; layerprune "
            f"supports: {', '.join(supported_families())}"
        )


def adapter_for(model: PreTrainedModel) -> ArchitectureAdapter:
    """The registered adapter for ``model``'s family, or an inferred one with a warning."""
    model_type = model.config.model_type
    if model_type in ADAPTERS:
        adapter = ADAPTERS.get(model_type)
        if getattr(model.config, "do_layer_norm_before", True) is False:  # OPT-350m
            adapter = dataclasses.replace(adapter, post_norm=True)
        return adapter
    adapter = infer_adapter(model)
    warnings.warn(
        f"architecture {model_type!r} has no registered adapter; using the decoder layers found at "
        f"{adapter.layers!r}. Supported families: {', '.join(supported_families())}",
        stacklevel=2,
    )
    return adapter


def infer_adapter(model: PreTrainedModel) -> ArchitectureAdapter:
    """Find the one ModuleList whose length equals the configured layer count."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if len(candidates) != 1 or embeddings is None or output is None:
        raise UsageError(
            f"architecture {model.config.model_type!r} is not supported and its decoder layers "
            f"could not be found automatically; supported: {', '.join(supported_families())}"
        )
    names = {module: name for name, module in model.named_modules()}
    layers = candidates[0]
    parent = layers.rpartition(".")[0]
    norms = [
        name for name, module in model.named_modules()
        if name.rpartition(".")[0] == parent and "norm" in type(module).__name__.lower()
    ]
    return ArchitectureAdapter(
        family=model.config.model_type, layers=layers, embeddings=names[embeddings],
        final_norm=norms[0] if norms else "", lm_head=names[output], inferred=True,
    )
