"""Export a (pruned) model as a standard checkpoint that plain transformers loads.

How a checkpoint is written is :class:`ExportConfig`, the one declaration of the export options:
:func:`layerprune.save` builds it from its keywords, the commands that write a checkpoint (prune,
heal, search) make their ``--out``/``--overwrite``/``--format`` flags from it, and a recipe's
``export`` section is read as its keys. The folder holds safetensors weights, config, generation config and tokenizer, plus
``layerprune.json`` (provenance) and a model card ``README.md`` (rendered here from the same record,
so that every writer of a checkpoint, in memory or shard by shard, writes the same card). It is written atomically, never
over an existing folder unless asked, and never into the source model.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.hub import convert_file_size_to_int

from layerprune.errors import UsageError
from layerprune.models.gguf_types import WRITABLE_TYPES, quant_type
from layerprune.options import NO_FLAG, Config, option
from layerprune.outputs import atomic_output_dir, check_free_space, check_output_path

SAFETY_MARGIN_BYTES = 64 * 2**20

FORMATS = ("transformers", "gguf", "decilm")
"""The checkpoint formats a model is written in: ``transformers`` (safetensors weights, config and
tokenizer that plain transformers loads), ``gguf`` (one llama.cpp file, :mod:`layerprune.models.gguf_export`),
``decilm`` (DeciLMForCausalLM with per-layer ``block_configs``, :mod:`layerprune.models.decilm`)."""

PLACEMENT = ("out", "overwrite")
"""The export options that say *where* a checkpoint goes, which a stage writing into a folder of its
own decides itself (a recipe's run folder, a search's output folder); the others say *what* is
written, and a recipe's ``export`` section gives them."""


class ExportConfig(Config):
    """Where a checkpoint goes and how it is written."""

    unit = "export"

    out: str | Path | None = option(None, "the checkpoint folder to write (none: where the stage writing it decides)")
    overwrite: bool = option(False, "replace an existing output folder, only one layerprune wrote (it holds a "
                             "layerprune.json, run.json or search.json record that validates as one) or an empty one")
    format: str = option("transformers", "checkpoint format: transformers (safetensors weights, config and "
                         "tokenizer that plain transformers loads), gguf (one model.gguf file for llama.cpp) or "
                         "decilm (Llama-architecture models as DeciLMForCausalLM: a removed attention or MLP is a "
                         "no-op block without weights, which vLLM, SGLang, TensorRT-LLM and mlx-lm run natively)",
                         choices=FORMATS)
    gguf_type: str | None = option(None, "with format gguf: the type of the tensors it quantizes (those a repair or "
                                   "healing changed, all of a non-GGUF source): " + ", ".join(WRITABLE_TYPES) +
                                   " (none: the source tensor's own type where gguf writes it, else Q8_0)",
                                   metavar="TYPE")
    max_shard_size: str | int = option("2GB", "the largest weight file: a size such as 2GB or 500MB, or bytes",
                                       flag=NO_FLAG)

    def check(self) -> None:
        """A shard size must read as a positive size, and a GGUF type be one gguf writes for a GGUF export,
        before anything is trained or written."""
        if self.gguf_type is not None:
            if self.format != "gguf":
                self.refuse("gguf_type", "applies to format gguf only; add that format or drop it")
            quant_type(self.gguf_type)
        try:
            size = convert_file_size_to_int(self.max_shard_size)
        except ValueError:
            size = 0
        if size < 1:
            self.refuse("max_shard_size", f"{self.max_shard_size!r} is not a size; write a whole number and a unit, "
                                          "e.g. 2GB or 500MB, or a number of bytes")

    def written(self) -> dict[str, Any]:
        """The options that say what is written (all but :data:`PLACEMENT`), as ``save()`` takes them."""
        return self.model_dump(exclude=set(PLACEMENT))


DEFAULT_EXPORT = ExportConfig()


def model_size_bytes(model: PreTrainedModel) -> int:
    """Bytes the weights take on disk (tied weights counted once, as safetensors stores them)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    *,
    overwrite: bool = False,
    protected: Iterable[str | Path] = (),
    extra_files: dict[str, str] | None = None,
    max_shard_size: str | int = DEFAULT_EXPORT.max_shard_size,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out`` atomically; returns the final folder.

    ``state_dict`` holds the weights to write when ``model``'s own are not whole: after FSDP training
    each process's parameters are its shards, and the main process writes the full weights the
    trainer gathered (:attr:`~layerprune.models.loading.LoadedModel.export_state`)."""
    protected = list(protected)
    target = check_output_path(out, overwrite=overwrite, protected=protected)
    if state_dict is None and any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        raise UsageError("this process holds only its FSDP shards of the model, so it cannot export it; save from "
                         "the main process, as `layerprune heal` does (recipes do not run under FSDP)")
    size = sum(t.numel() * t.element_size() for t in state_dict.values()) if state_dict else model_size_bytes(model)
    check_free_space(target.parent, size + SAFETY_MARGIN_BYTES)
    with atomic_output_dir(target, overwrite=overwrite, protected=protected) as staging:
        try:
            model.save_pretrained(staging, max_shard_size=max_shard_size, state_dict=state_dict)
        except SafetensorError as error:
            raise _as_os_error(error, staging) from None
        tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return target


def _as_os_error(error: SafetensorError, where: Path) -> Exception:
    """safetensors reports a failed write (a full disk, a quota) as its own error, with the system's code
    inside its message: as an :class:`OSError` the command says it in one line, like every other failed
    write; anything else stays what it was."""
    code = re.search(r"code: (\d+)", str(error))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(where)) if code else error


def provenance_json(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2) + "\n"


def _gguf_load(gguf: dict[str, Any], folder: str | Path) -> list[str]:
    """How a GGUF export loads: in llama.cpp (or anything built on it), and in transformers' GGUF loader."""
    kinds = sorted({tensor["type"] for tensor in gguf["tensors"].values()})
    return [
        f"One GGUF file, `{gguf['file']}` (llama.cpp architecture `{gguf['architecture']}`; tensor types "
        f"{', '.join(kinds)}; each tensor's type, and whether it was copied from the source file or quantized, is "
        "in `layerprune.json`).",
        "",
        "```sh",
        f"llama-cli -m {shlex.quote(str(Path(folder) / gguf['file']))} -p \"Hello\"",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, gguf_file={gguf['file']!r})",
        "```",
        "",
    ]


def render_model_card(record: dict[str, Any], folder: str | Path) -> str:
    """The model card: what was removed, why, and how to load the result with plain transformers, for
    a next user who may never have heard of layerprune; ``folder`` is where it is written, as the user
    named it (what the loading snippet opens)."""
    removed = record.get("removed_layers", [])
    replaced = record.get("replaced_blocks", [])
    lines = [
        "---",
        "library_name: transformers",
        "tags: [layerprune, depth-pruning]",
        "---",
        f"# {record.get('source_model', 'model')} — depth-pruned with layerprune",
        "",
        f"- Source model: `{record.get('source_model')}`",
        f"- Decoder layers: {record.get('original_num_layers')} → {record.get('num_layers')}",
        f"- Parameters: {record.get('original_parameters', 0):,} → {record.get('parameters', 0):,}",
        f"- Removed layers (indices in the original model): {removed if removed else 'none'}",
        f"- Why: {record.get('reason', 'layers named by the user')}",
    ]
    for block in replaced:
        lines.append(
            f"- Layers {block['start']}..{block['end'] - 1} of the original model were replaced by one "
            f"trained `{block['kind']}` module. {block.get('note', '')}".rstrip()
        )
    for step in record.get("healing", []):
        lines.append(f"- Healed with `{step.get('method')}`: {step.get('summary', '')}".rstrip(": "))
    if record.get("removed_attention") or record.get("removed_mlp"):
        lines.append(f"- Removed attention of layers {record.get('removed_attention')} and MLP of layers "
                     f"{record.get('removed_mlp')} (original indices); zero partners: {record.get('zero_partners', 0)}")
    if record.get("format") == "decilm":
        load = ["The DeciLM / Nemotron-NAS layout (`DeciLMForCausalLM`, `block_configs`): vLLM, SGLang and "
                "TensorRT-LLM load it with NVIDIA's `configuration_decilm.py` beside the config "
                "(`--trust-remote-code`), mlx-lm reads it as it is, and `layerprune.load_model` loads it back.", ""]
    else:
        load = (_gguf_load(record["gguf"], folder) if record.get("gguf") else [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})",
            "```",
            "",
        ]) + ["This is a standard checkpoint: no layerprune import and no remote code are needed."]
    lines += ["", "## Load", "", *load,
              f"Provenance (recipe, versions, date) is in `layerprune.json`. Written by layerprune {record.get('versions', {}).get('layerprune', '')}.",
              ""]
    return "\n".join(lines)
