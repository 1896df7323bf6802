"""The DeciLM / Nemotron-NAS layout: a Llama whose layers may lack their attention or their MLP.

Runtimes run a heterogeneous model natively in this layout (``architectures: [DeciLMForCausalLM]``,
``model_type: nemotron-nas``): vLLM ``vllm/model_executor/models/nemotron_nas.py``, SGLang
``srt/models/nemotron_nas.py``, TensorRT-LLM ``_torch/models/modeling_nemotron_nas.py``, mlx-lm
``mlx_lm/models/nemotron-nas.py`` and llama.cpp's ``deci`` architecture. What this module writes was
checked against vLLM's loader (vllm-project/vllm, ``vllm/model_executor/models/nemotron_nas.py``) and
mlx-lm's (ml-explore/mlx-lm, ``mlx_lm/models/nemotron-nas.py``), since neither runs here:

- one ``block_configs`` entry per layer, ``{"attention": {"no_op", "replace_with_linear",
  "n_heads_in_group"}, "ffn": {"no_op", "replace_with_linear", "ffn_mult"}}``; vLLM's
  ``DeciLMDecoderLayer.__init__`` reads ``block_config.attention.no_op`` / ``ffn.no_op`` (lines
  137-139), ``num_kv_heads = num_attention_heads // attention.n_heads_in_group`` (154-156) and the
  MLP width from ``ffn.ffn_mult`` (172-176) as ``_ffn_mult_to_intermediate_size`` computes it
  (64-74: ``int(2 * ffn_mult * hidden_size / 3)`` rounded up to a multiple of 256); mlx-lm's
  ``FFNConfig`` requires ``ffn_mult`` for every active MLP and ``AttentionConfig`` requires
  ``n_heads_in_group`` for every active attention;
- Llama weight names; a layer without attention has no ``self_attn.*`` and no ``input_layernorm``
  (created only ``if not self._is_no_op_attention``, lines 153-169), one without MLP no ``mlp.*`` and
  no ``post_attention_layernorm`` (171-194); vLLM's ``load_weights`` looks every stored tensor up in
  the model's parameters, so a weight for a no-op branch would fail the load.

``model_type: nemotron-nas`` is not a transformers model type: runtimes that read the config through
transformers (vLLM, SGLang) need NVIDIA's ``configuration_decilm.py`` beside it (``--trust-remote-code``);
mlx-lm and llama.cpp's converter read ``config.json`` directly. layerprune loads the layout back
itself (:func:`load_decilm`) as a Llama with those branches removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from layerprune.errors import UsageError
from layerprune.models.architectures import adapter_for
from layerprune.models.sublayers import ATTENTION, KINDS, MLP, has_branch, remove_branch

DECILM_ARCHITECTURE = "DeciLMForCausalLM"
DECILM_MODEL_TYPE = "nemotron-nas"
SOURCE_TYPES = ("llama", "mistral")
"""Model types whose layers are DeciLM's: Llama, and Mistral where it has no sliding window (DeciLM
attends to every earlier token) and the heads split the hidden size (DeciLM derives the head size)."""
FFN_MULTIPLE = 256
"""The multiple the runtimes round the MLP width up to (vLLM's ``_find_multiple(..., 256)``)."""
_DROPPED = ("intermediate_size", "num_key_value_heads", "architectures", "model_type", "sliding_window",
            "use_sliding_window", "max_window_layers", "head_dim", "layer_types", "auto_map")


def decilm_refusal(config: PretrainedConfig, *, ffn_mult: bool = True) -> str | None:
    """Why a model of ``config`` cannot be written as DeciLM (None: it can); ``ffn_mult``: whether its MLP
    width must be one that ``ffn_mult`` expresses (llama.cpp's ``deci`` stores the width itself)."""
    if config.model_type not in SOURCE_TYPES:
        return (f"the DeciLM layout holds Llama-architecture models ({', '.join(SOURCE_TYPES)}), not "
                f"{config.model_type}")
    if getattr(config, "sliding_window", None):
        return "the DeciLM layout attends to every earlier token, and this model has a sliding window"
    head_dim = getattr(config, "head_dim", None)
    if head_dim and head_dim * config.num_attention_heads != config.hidden_size:
        return "the DeciLM layout derives the head size from the hidden size, and this model's heads do not split it"
    if ffn_mult and config.intermediate_size % FFN_MULTIPLE:
        return (f"the runtimes read an MLP width from ffn_mult rounded up to a multiple of {FFN_MULTIPLE}, and this "
                f"model's is {config.intermediate_size}")
    return None


def check_decilm(config: PretrainedConfig, *, ffn_mult: bool = True) -> None:
    """Refuse a model the DeciLM layout cannot hold (format decilm, or with ``ffn_mult`` off the GGUF
    ``deci`` architecture of a sub-layer cut), naming the format that can."""
    reason = decilm_refusal(config, ffn_mult=ffn_mult)
    if reason is not None:
        raise UsageError(f"{reason}; export with format transformers")


def ffn_mult(config: PretrainedConfig) -> float:
    """The multiplier the runtimes turn back into ``config.intermediate_size``: ``int(2 * m * h / 3)``
    is within one of it, and rounding up to a multiple of 256 (which it is) gives it exactly."""
    return round(1.5 * config.intermediate_size / config.hidden_size, 6)


def block_configs(model: PreTrainedModel) -> list[dict[str, Any]]:
    """One ``block_configs`` entry per decoder layer of ``model``: which branches it computes."""
    adapter = adapter_for(model)
    config = model.config
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    entries = []
    for layer in adapter.decoder_layers(model):
        attention = {"no_op": not has_branch(layer, adapter, ATTENTION), "replace_with_linear": False}
        ffn = {"no_op": not has_branch(layer, adapter, MLP), "replace_with_linear": False}
        if not attention["no_op"]:
            attention["n_heads_in_group"] = group
        if not ffn["no_op"]:
            ffn["ffn_mult"] = ffn_mult(config)
        entries.append({"attention": attention, "ffn": ffn})
    return entries


def decilm_config(model: PreTrainedModel) -> dict[str, Any]:
    """``config.json`` of ``model`` as DeciLM: the Llama fields the runtimes read, and ``block_configs``
    in place of the widths they derive from it."""
    check_decilm(model.config)
    fields = {key: value for key, value in model.config.to_dict().items() if key not in _DROPPED}
    return {**fields, "architectures": [DECILM_ARCHITECTURE], "model_type": DECILM_MODEL_TYPE,
            "block_configs": block_configs(model)}


def decilm_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """``model``'s weights under Llama names, without the norms of removed branches (the removed
    branches themselves hold none): exactly the tensors a DeciLM loader creates parameters for."""
    adapter = adapter_for(model)
    state = dict(model.state_dict())
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for kind in KINDS:
            if not has_branch(layer, adapter, kind):
                for norm in adapter.branch_norms(kind):
                    for name in list(state):
                        if name.startswith(f"{adapter.layers}.{index}.{norm}."):
                            del state[name]
    return state


def is_decilm(folder: Path) -> bool:
    """Whether ``folder`` holds a DeciLM checkpoint (by its ``config.json``)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and DECILM_ARCHITECTURE in (config.get("architectures") or [])


def llama_config(fields: dict[str, Any]) -> LlamaConfig:
    """The Llama config a DeciLM ``config.json`` describes, its widths taken from its active blocks
    (which layerprune writes uniform; other DeciLM checkpoints vary them and are refused)."""
    blocks = fields.get("block_configs") or []
    groups = {b["attention"].get("n_heads_in_group") for b in blocks if not b["attention"].get("no_op")}
    mults = {b["ffn"].get("ffn_mult") for b in blocks if not b["ffn"].get("no_op")}
    if len(blocks) != fields.get("num_hidden_layers") or len(groups) > 1 or len(mults) > 1 or any(
            b["attention"].get("replace_with_linear") or b["ffn"].get("replace_with_linear") for b in blocks):
        raise UsageError("this DeciLM checkpoint varies its layers' widths or replaces branches with linear maps, "
                         "which layerprune cannot load; load it with its runtime")
    hidden = fields["hidden_size"]
    mult = mults.pop() if mults else 1.5
    width = int(2 * mult * hidden / 3)
    width += -width % FFN_MULTIPLE
    heads = fields["num_attention_heads"]
    kept = {k: v for k, v in fields.items() if k not in ("block_configs", "architectures", "model_type")}
    return LlamaConfig(**{**kept, "intermediate_size": width,
                          "num_key_value_heads": heads // (groups.pop() if groups else 1)})


def load_decilm(folder: Path, dtype: torch.dtype, check_config: Any = None
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A DeciLM checkpoint as a Llama whose no-op branches are removed (as :func:`prune` leaves them)."""
    fields = json.loads((folder / "config.json").read_text())
    config = llama_config(fields)
    if check_config is not None:
        check_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    adapter = adapter_for(model)
    unstored: dict[str, torch.Tensor] = {}  # the norms of no-op branches: never applied to anything kept
    for index, (layer, block) in enumerate(zip(adapter.decoder_layers(model), fields["block_configs"], strict=True)):
        for kind, key in ((ATTENTION, "attention"), (MLP, "ffn")):
            if block[key].get("no_op"):
                remove_branch(layer, adapter, kind)
                unstored.update({f"{adapter.layers}.{index}.{norm}.weight": torch.ones(config.hidden_size)
                                 for norm in adapter.branch_norms(kind)})
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    expected = set(model.state_dict()) - set(unstored)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UsageError(f"the DeciLM checkpoint {folder} does not match its block_configs (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); the files were changed: download or export it again")
    model.load_state_dict({k: v.to(dtype) for k, v in {**state, **unstored}.items()}, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers are computed, not stored
    return model.eval(), AutoTokenizer.from_pretrained(folder)

