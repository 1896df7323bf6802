"""Reading GGUF files (llama.cpp's quantized format) as ordinary float models.

Apart from :mod:`layerprune.models.loading` so that the offline aliases, which ship as GGUF files
and are de-quantized once into the cache, can convert them without importing the loader that
resolves those aliases.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from layerprune.errors import UsageError, first_line


def strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as the ordinary float model it is after de-quantization.

    transformers keeps the GGUF quantizer attached and refuses to save such a model, although
    its weights are plain tensors; dropping the quantizer makes it saveable and reloadable.
    """
    model.hf_quantizer = None
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load and de-quantize a GGUF file into a saveable float model and its tokenizer.

    transformers draws its de-quantization bar with a plain ``tqdm`` that ignores its own
    progress-bar switch, so the bar shows even where stderr is not a terminal: transformers offers
    no way to quiet it short of replacing its module's ``tqdm``, which this library does not do."""
    if not path.is_file():
        raise UsageError(f"GGUF file {path} does not exist; check the path")
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        sliding = sliding_layers(path)
        if sliding is not None and getattr(config, "layer_types", None) is not None:
            config.layer_types = ["sliding_attention" if flag else "full_attention" for flag in sliding]
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # struct.error: a truncated file; StrictDataclassError: metadata that makes no valid config
    except (ValueError, OSError, KeyError, RuntimeError, struct.error, StrictDataclassError) as error:
        raise UsageError(f"cannot read GGUF file {path}: {first_line(error)}; is it a valid GGUF causal LM?") from None
    strip_gguf_quantizer(model)
    return model, tokenizer


def sliding_layers(path: Path) -> list[bool] | None:
    """The per-layer sliding-window flags of a GGUF file that spells them out (a Gemma-3 file with layers
    cut), which transformers' GGUF loader ignores: without them it would give the kept layers the
    original period's pattern."""
    reader = gguf.GGUFReader(path, "r")
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    field = reader.fields.get(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=architecture))
    value = field.contents() if field is not None else None
    return [bool(flag) for flag in value] if isinstance(value, list) else None

