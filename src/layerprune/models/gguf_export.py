"""``--format gguf``: write a loaded (pruned, repaired, healed) model as one GGUF file for llama.cpp.

From a GGUF source (a ``.gguf`` file or an alias that ships as one) every tensor whose values are
those the source file de-quantizes to (all of them when only layers were removed) is copied byte for
byte in its own quantization, renumbered, and the source's header (tokenizer, chat template, every
hyper-parameter) is kept with its per-layer entries cut (:func:`layerprune.models.gguf_file.cut_layer_fields`).
A tensor that changed (a repair's fold, healing) and every tensor of a non-GGUF source is quantized by
the ``gguf`` package to the requested type (default: the source tensor's own type where ``gguf`` can
write it, else Q8_0; a float source keeps its float type); 1-D tensors (norms, biases) stay F32, as
llama.cpp keeps them. ``layerprune.json`` records every tensor's type and whether it was copied.

Only whole-layer removal keeps a model a model of its own architecture, so that is what this writes;
without a source file the header is built from the config through transformers' own GGUF tables
(the ones its GGUF loader reads back), and the tokenizer from a byte-level BPE tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from layerprune.errors import OptionError, UsageError
from layerprune.models.aliases import MODEL_ALIASES, fetch_alias_gguf
from layerprune.models.decilm import check_decilm, decilm_state
from layerprune.models.export import SAFETY_MARGIN_BYTES, provenance_json, render_model_card
from layerprune.models.gguf_file import (
    GGUF_FILE, RECORD_KEY, Metadata, TensorOut, architecture_of, cut_layer_fields, gguf_record, layer_name, layer_of,
    model_arch, open_gguf, read_fields, record_field, source_block_count, write_gguf,
)
from layerprune.models.gguf_types import WRITABLE_TYPES, quant_type
from layerprune.models.lineage import PROVENANCE_FILE, final_record, read_lineage
from layerprune.models.loading import LoadedModel
from layerprune.models.provenance import checked_record
from layerprune.models.sublayers import present_branches
from layerprune.outputs import atomic_output_dir, check_free_space, check_output_path

DECI = "deci"
"""llama.cpp's architecture for a Llama whose layers may lack their attention or MLP (Nemotron-NAS)."""

DEVICE_MAP_REFUSAL = ("spreads the model over devices, and a GGUF export reads every tensor on the CPU; load it "
                      "without a device map to export GGUF")
_FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_VALUE = gguf.GGUFValueType


@dataclass(frozen=True)
class SourceFile:
    """The GGUF file a model was loaded from, and the original layer each of its blocks holds."""

    path: Path
    reader: gguf.GGUFReader
    original_layers: list[int]

    def tensor(self, name: str) -> Any:
        return next((tensor for tensor in self.reader.tensors if tensor.name == name), None)


def source_file(loaded: LoadedModel) -> SourceFile | None:
    """The GGUF file ``loaded`` came from: the one it was loaded from, or the file an alias ships as."""
    alias = MODEL_ALIASES.get(loaded.source)
    path = loaded.gguf_path or (fetch_alias_gguf(alias) if alias is not None else None)
    if path is None:
        return None
    reader = open_gguf(path)
    architecture = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    blocks = source_block_count(reader, architecture)
    original = read_lineage(path.parent).get("kept_layers") if loaded.gguf_path else None
    return SourceFile(path, reader, list(original or range(blocks)))


def save_gguf(loaded: LoadedModel, out: str | Path, *, overwrite: bool, protected: Sequence[str | Path],
              gguf_type: str | None, recipe: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` to ``out/model.gguf`` with ``layerprune.json`` and the model card beside it."""
    config = loaded.model.config
    branch_cut = not all(all(present) for present in present_branches(loaded.model, loaded.adapter))
    if branch_cut:  # layers without their attention or MLP: llama.cpp's deci, a Llama with per-layer widths
        check_decilm(config, ffn_mult=False)
        check_deci_layers(present_branches(loaded.model, loaded.adapter))
    architecture = DECI if branch_cut else architecture_of(config.model_type)
    requested = quant_type(gguf_type) if gguf_type else None
    if getattr(loaded.model, "hf_device_map", None):
        raise OptionError.about("device_map", DEVICE_MAP_REFUSAL)
    source = None if branch_cut else source_file(loaded)  # another architecture: every tensor written anew
    protected = [*protected, *([source.path] if source else [])]
    target = check_output_path(out, overwrite=overwrite, protected=protected)
    state = decilm_state(loaded.model) if branch_cut else loaded.export_state or loaded.model.state_dict()
    tensors, copied = plan_tensors(loaded, state, architecture, source, requested)
    if branch_cut:
        fields = [*deci_fields(loaded), *tokenizer_fields(loaded.tokenizer, config)]
    elif source is not None:
        kept = [source.original_layers.index(layer) for layer in loaded.original_layer_ids]
        fields = cut_layer_fields([f for f in read_fields(source.reader) if f.key != RECORD_KEY], architecture,
                                  len(source.original_layers), kept)
    else:
        fields = [*config_fields(config, architecture, loaded.num_layers), *tokenizer_fields(loaded.tokenizer, config)]
    record = checked_record({**final_record(loaded, recipe), "gguf": gguf_record(
        architecture, str(source.path) if source else None, tensors, copied=copied)})
    check_free_space(target.parent, sum(t.nbytes for t in tensors) + SAFETY_MARGIN_BYTES)
    with atomic_output_dir(target, overwrite=overwrite, protected=protected) as staging:
        write_gguf(staging / GGUF_FILE, architecture, [*fields, record_field(record)], tensors)
        (staging / PROVENANCE_FILE).write_text(provenance_json(record))
        (staging / "README.md").write_text(render_model_card(record, out))
    return target


def plan_tensors(loaded: LoadedModel, state: dict[str, torch.Tensor], architecture: str, source: SourceFile | None,
                 requested: gguf.GGMLQuantizationType | None) -> tuple[list[TensorOut], list[str]]:
    """Every tensor of the file, named by gguf's tensor-name table, and the names of those copied from
    the source file (their values equal what the source de-quantizes to, compared as transformers'
    GGUF loader reads them)."""
    config = loaded.model.config
    names = gguf.get_tensor_name_map(model_arch(architecture), loaded.num_layers)
    reverse = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=_head_counts(config))
    tied = getattr(config, "tie_word_embeddings", False)
    tensors: list[TensorOut] = []
    copied: list[str] = []
    for hf_name, value in state.items():
        if tied and hf_name.endswith("lm_head.weight"):
            continue  # llama.cpp (and transformers' GGUF loader) tie the head when output.weight is absent
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise UsageError(f"{hf_name} has no name in gguf's {architecture} tensor table; export this model with "
                             "--format transformers")
        name = f"{mapped}.{suffix}"
        original = _source_tensor(source, name, loaded.original_layer_ids)
        if original is not None and _unchanged(original, value, name, reverse):
            tensors.append(TensorOut(name, tuple(value.shape), original.tensor_type, int(original.n_bytes),
                                     source=(source.path, int(original.data_offset))))
            copied.append(name)
            continue
        own = original.tensor_type.name if original is not None else _FLOAT_TYPES.get(value.dtype, "F32")
        tensors.append(_quantized(name, value, architecture, config, requested, own))
    return tensors, copied


def _head_counts(config: PretrainedConfig) -> dict[str, Any]:
    return {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}


def _source_tensor(source: SourceFile | None, name: str, original_layers: list[int]) -> Any:
    """The source file's tensor that ``name`` (in the current numbering) started as, if any."""
    if source is None:
        return None
    where = layer_of(name)
    if where is None:
        return source.tensor(name)
    layer = original_layers[where[0]]
    if layer not in source.original_layers:
        return None
    return source.tensor(layer_name(source.original_layers.index(layer), where[1]))


def _unchanged(original: Any, value: torch.Tensor, name: str, reverse: TensorProcessor) -> bool:
    """Whether ``value`` is what transformers' GGUF loader makes of ``original`` (de-quantized, then its
    architecture's processor: llama's q/k un-permuted, Gemma's norms less one), in ``value``'s dtype."""
    loaded = gguf.quants.dequantize(original.data, original.tensor_type)
    loaded = np.asarray(reverse.process(loaded, name).weights)
    if tuple(loaded.shape) != tuple(value.shape):
        return False
    return torch.equal(torch.from_numpy(np.array(loaded)).to(value.dtype), value.detach().cpu())


def _quantized(name: str, value: torch.Tensor, architecture: str, config: PretrainedConfig,
               requested: gguf.GGMLQuantizationType | None, own: str) -> TensorOut:
    """A changed tensor, in llama.cpp's layout, encoded when its turn to be written comes."""
    shape = tuple(value.shape)
    if value.dim() == 1:
        kind = gguf.GGMLQuantizationType.F32  # norms and biases: llama.cpp computes them in F32
    else:
        kind = requested or gguf.GGMLQuantizationType[own if own in WRITABLE_TYPES else "Q8_0"]
        if shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16  # rows that are no whole number of blocks cannot be block-quantized
    block, size = gguf.GGML_QUANT_SIZES[kind]
    nbytes = value.numel() // block * size

    def make() -> np.ndarray:
        data = to_gguf_layout(architecture, name, value.detach().float().cpu().numpy(), config)
        return gguf.quants.quantize(data, kind)

    return TensorOut(name, shape, kind, nbytes, make=make)


def to_gguf_layout(architecture: str, name: str, data: np.ndarray, config: PretrainedConfig) -> np.ndarray:
    """A tensor as llama.cpp stores it, the inverse of transformers' GGUF processors: llama's q and k rows
    interleaved for its rotary layout (convert_hf_to_gguf's ``permute``), Gemma's norms stored plus one."""
    if architecture in ("llama", DECI) and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    if architecture == "gemma3" and "norm.weight" in name:
        return data + 1
    return data


def _config_value(config: PretrainedConfig, key: str, layer_type: str = "full_attention") -> Any:
    """A config attribute, looked up in its rope parameters too (where transformers keeps ``rope_theta``,
    per layer type for Gemma-3)."""
    value = getattr(config, key, None)
    if value is None:
        rope = getattr(config, "rope_parameters", None) or {}
        value = rope.get(layer_type, rope).get(key)
    return value


def _number(key: str, value: Any) -> Metadata:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"{key}: {value!r} is not a number")
    return Metadata(key, value, _VALUE.UINT32 if isinstance(value, int) else _VALUE.FLOAT32)


def config_fields(config: PretrainedConfig, architecture: str, num_layers: int) -> list[Metadata]:
    """The hyper-parameters of a model with no GGUF source, through transformers' GGUF config table (so its
    loader reads back the same config), plus the keys llama.cpp needs that the table leaves out."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fields = [Metadata(gguf.Keys.General.NAME, str(getattr(config, "_name_or_path", "") or architecture), _VALUE.STRING)]
    for suffix, attribute in GGUF_CONFIG_MAPPING[architecture].items():
        value = num_layers if attribute == "num_hidden_layers" else head_dim if suffix == "rope.dimension_count" \
            else _config_value(config, attribute) if attribute else None
        if value is not None:
            fields.append(_number(f"{architecture}.{suffix}", value))
    for key in (gguf.Keys.Attention.KEY_LENGTH, gguf.Keys.Attention.VALUE_LENGTH):
        if not any(f.key == key.format(arch=architecture) for f in fields):
            fields.append(_number(key.format(arch=architecture), head_dim))
    if architecture == "gemma3":
        fields += _gemma3_fields(config, head_dim)
    return fields


def check_deci_layers(present: list[tuple[bool, bool]]) -> None:
    """Refuse what llama.cpp's deci computes otherwise than the model (llama-cpp-python 0.3.36, tested):
    it reads the head size only where the first layer has attention (it fails to load otherwise), and
    a layer with attention but no MLP (``feed_forward_length`` 0) leaves the residual stream as the layer
    received it, dropping the attention's output as well."""
    if not present[0][0]:
        raise UsageError("llama.cpp reads a deci model's head size only where its first layer has attention; keep "
                         "the first layer's attention or export with format decilm or transformers")
    alone = [index for index, (attention, mlp) in enumerate(present) if attention and not mlp]
    if alone:
        raise UsageError(f"llama.cpp's deci drops the attention of a layer without MLP as well (layers {alone} as cut); "
                         "remove only attention branches for GGUF, or export with format decilm or transformers")


def deci_fields(loaded: LoadedModel) -> list[Metadata]:
    """llama.cpp's ``deci`` header: Llama's keys under ``deci.``, with the head counts and the MLP width per
    layer, 0 where the layer has no attention (``head_count``) or no MLP (``feed_forward_length``): what
    llama.cpp's deci loader reads to skip a branch."""
    config = loaded.model.config
    present = present_branches(loaded.model, loaded.adapter)
    per_layer = {
        "attention.head_count": [config.num_attention_heads if attention else 0 for attention, _ in present],
        "attention.head_count_kv": [config.num_key_value_heads if attention else 0 for attention, _ in present],
        "feed_forward_length": [config.intermediate_size if mlp else 0 for _, mlp in present],
    }
    fields = [replace(f, key=f"{DECI}.{f.key.removeprefix('llama.')}") if f.key.startswith("llama.") else f
              for f in config_fields(config, "llama", loaded.num_layers)
              if f.key.removeprefix("llama.") not in per_layer]
    return fields + [Metadata(f"{DECI}.{key}", values, _VALUE.ARRAY, _VALUE.UINT32) for key, values in per_layer.items()]


def _gemma3_fields(config: PretrainedConfig, head_dim: int) -> list[Metadata]:
    """What llama.cpp's Gemma-3 reads besides: the sliding layers spelled out, the local rope base and the
    logit soft-capping; it fixes the attention scale at 1/sqrt(head_dim), so another scale is refused."""
    if config.query_pre_attn_scalar != head_dim:
        raise UsageError(f"llama.cpp scales Gemma-3 attention by 1/sqrt(head_dim={head_dim}) and this model by "
                         f"1/sqrt({config.query_pre_attn_scalar}); export it with --format transformers")
    arch = "gemma3"
    fields = [Metadata(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch),
                       [kind == "sliding_attention" for kind in config.layer_types], _VALUE.ARRAY, _VALUE.BOOL),
              _number(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=arch),
                      float(_config_value(config, "rope_theta", "sliding_attention")))]
    if getattr(config, "final_logit_softcapping", None):
        fields.append(_number(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=arch), float(config.final_logit_softcapping)))
    return fields


def tokenizer_fields(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> list[Metadata]:
    """A byte-level tokenizer as llama.cpp's BPE (``gpt2``) vocabulary: tokens by id, their kinds, merges,
    special ids and the chat template. Others (SentencePiece, WordPiece on text) are refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise UsageError("layerprune writes the GGUF vocabulary of byte-level BPE tokenizers only; export this model "
                         "with --format transformers and convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab_size = max(config.vocab_size, len(tokenizer))
    tokens = [token or f"[PAD{index}]" for index, token in
              enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))]
    tokens += [f"[PAD{index}]" for index in range(len(tokens), vocab_size)]
    special = set(tokenizer.all_special_ids)
    kinds = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in (spec.get("model") or {}).get("merges", [])]
    if not merges:  # a vocabulary of single bytes: GGUF has no empty arrays and llama.cpp wants merges, so one
        merges = [f"{tokens[min(special)]} {tokens[max(special)]}"]  # of two control tokens, which never occur in text
    tok = gguf.Keys.Tokenizer
    fields = [Metadata(tok.MODEL, "gpt2", _VALUE.STRING), Metadata(tok.PRE, "default", _VALUE.STRING),
              Metadata(tok.LIST, tokens, _VALUE.ARRAY, _VALUE.STRING),
              Metadata(tok.TOKEN_TYPE, kinds, _VALUE.ARRAY, _VALUE.INT32),
              Metadata(tok.MERGES, merges, _VALUE.ARRAY, _VALUE.STRING),
              Metadata(tok.ADD_BOS, False, _VALUE.BOOL)]
    for key, token_id in ((tok.BOS_ID, tokenizer.bos_token_id), (tok.EOS_ID, tokenizer.eos_token_id),
                          (tok.UNK_ID, tokenizer.unk_token_id), (tok.PAD_ID, tokenizer.pad_token_id)):
        if token_id is not None:
            fields.append(Metadata(key, int(token_id), _VALUE.UINT32))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        fields.append(Metadata(tok.CHAT_TEMPLATE, tokenizer.chat_template, _VALUE.STRING))
    return fields
