"""Load any causal LM: a local folder, a GGUF file, a hub id, or one of our offline aliases.

Loading never runs remote code unless the user passes ``trust_remote_code=True`` and never
unpickles weights unless they pass ``allow_pickle=True``. Every failure a user can fix becomes a
:class:`~layerprune.errors.UsageError` that says what to do.
"""

from __future__ import annotations

import copy
import difflib
import logging
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
)

from layerprune import hub
from layerprune.errors import OptionError, UsageError, first_line
from layerprune.models.aliases import MODEL_ALIASES, alias_checkpoint_dir, resolve_alias
from layerprune.models.architectures import ArchitectureAdapter, adapter_for
from layerprune.models.checkpoint import read_config
from layerprune.models.decilm import is_decilm, load_decilm
from layerprune.models.gguf import load_gguf
from layerprune.models.lineage import read_lineage
from layerprune.models.sublayers import restore_removed_branches

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model with everything layerprune needs to know about where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    adapter: ArchitectureAdapter
    local_dir: Path | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    export_state: dict[str, torch.Tensor] | None = None
    """The full weights :func:`layerprune.save` writes instead of ``model``'s own, where those are not
    whole: after FSDP training each process's model holds only its shards, and :func:`layerprune.heal`
    returns the main process's model with the weights it gathered here. ``None`` otherwise; a
    :meth:`copy` starts without it (it is cut or trained apart from these weights), and cutting a model
    that holds it in place is refused (:func:`~layerprune.models.editing.refuse_sharded`)."""
    gguf_path: Path | None = None
    """The GGUF file the model was loaded from: a GGUF export copies the tensors it did not change from it."""

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def __repr__(self) -> str:
        """One line: what it is and how big (the dataclass default prints the whole module tree)."""
        parameter = next(self.model.parameters(), None)
        removed = len(self.lineage.get("removed_layers", []))
        return (f"LoadedModel({self.source!r}, family={self.adapter.family}, layers={self.num_layers}"
                + (f" ({removed} removed)" if removed else "")
                + f", parameters={sum(p.numel() for p in self.model.parameters()):,}"
                + (f", dtype={str(parameter.dtype).removeprefix('torch.')}, device={parameter.device}"
                   if parameter is not None else "") + ")")

    @property
    def original_layer_ids(self) -> list[int]:
        """For each current layer, its index in the original (unpruned) model."""
        return list(self.lineage.get("kept_layers", range(self.num_layers)))

    def copy(self, share_weights: bool = False) -> LoadedModel:
        """An independent copy to cut or train, so this model stays whole for its next use.

        The tokenizer and adapter, which pruning never changes, are always shared. With
        ``share_weights`` only the module tree is copied and the weight tensors are shared: a
        view that can be cut and evaluated (iterative re-scoring) at no second copy of the weights,
        but must not be trained.
        """
        memo = {id(parameter): parameter for parameter in self.model.parameters()} if share_weights else None
        return LoadedModel(copy.deepcopy(self.model, memo=memo), self.tokenizer, self.source, self.adapter,
                           self.local_dir, copy.deepcopy(self.lineage), gguf_path=self.gguf_path)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise OptionError.about("device", f"{device!r} is unknown; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError.about("device", f"{device!r} was asked for but no CUDA GPU is available; use cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 by default on CPU; bfloat16 on GPUs that support it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use one of: float32, bfloat16, float16, auto") from None


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | None, gguf: bool) -> None:
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise OptionError.about("device_map", f"{device_map!r} is unknown; use one of {', '.join(DEVICE_MAPS)}")
    if gguf:
        raise OptionError.about("device_map", "does not apply to GGUF files, which are de-quantized on the CPU; use "
                                              "a device instead")


def _check_local_folder(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json); pass a checkpoint folder, a .gguf file or a hub id")
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise UsageError(
            f"{folder} holds only pickle weights (.bin/.pt), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    if not has_safetensors and not has_pickle:
        raise UsageError(f"{folder} has a config.json but no weight files (*.safetensors); is the download complete?")


def load_model(
    name_or_path: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    check_config: Callable[[PretrainedConfig], None] | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for scoring and surgery.

    ``name_or_path`` is an alias (``smollm2-135m``, ``gemma3-270m``), a local checkpoint folder,
    a ``.gguf`` file (or a folder plus ``gguf_file``), or a Hugging Face hub id.
    ``check_config`` sees the config before any weights are read (not for GGUF files, whose
    config lives inside the weights), so a caller can refuse input that does not fit the model
    (layer indices, sequence length) in the first second instead of after a long load.
    ``device_map`` (``auto``, ``balanced``, ``sequential``) lets accelerate spread a model that
    fits no single device over all GPUs and the CPU; ``device`` is then ignored.
    """
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    source = str(name_or_path)
    check_device_map(device_map, bool(gguf_file) or source.endswith(".gguf"))
    local = resolve_alias(source) if source in MODEL_ALIASES else Path(source).expanduser()

    if local.suffix == ".gguf" or gguf_file:
        gguf_path = local if local.suffix == ".gguf" else local / check_gguf_name(gguf_file)
        model, tokenizer = load_gguf(gguf_path, torch_dtype)
        folder: Path | None = gguf_path.parent
        from_gguf: Path | None = gguf_path.resolve()
    elif local.exists() and is_decilm(local):  # a layout transformers has no class for: read as a cut Llama
        folder, from_gguf = local, None
        model, tokenizer = load_decilm(folder, torch_dtype, check_config)
    elif local.exists():
        folder, from_gguf = local, None
        _check_local_folder(folder, allow_pickle)
        model, tokenizer = _load_pretrained(str(folder), torch_dtype, trust_remote_code, allow_pickle, check_config,
                                            device_map)
    elif _is_hub_id(source):
        check_hub_id(source, network=True)
        folder = from_gguf = None
        model, tokenizer = _load_pretrained(source, torch_dtype, trust_remote_code, allow_pickle, check_config,
                                            device_map)
    else:
        raise _missing_model(source)
    if device_map is None:
        model.to(target_device)
    model.eval()
    adapter = adapter_for(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lineage = read_lineage(folder)
    if lineage.get("branches"):  # zero partners of a sub-layer cut: removed branches again, costing nothing
        restore_removed_branches(model, adapter, lineage["branches"])
    return LoadedModel(model, tokenizer, source, adapter, folder, lineage, gguf_path=from_gguf)


def _load_pretrained(
    where: str, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool,
    check_config: Callable[[PretrainedConfig], None] | None = None, device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    config = read_config(where, trust_remote_code=trust_remote_code)
    if check_config is not None:
        check_config(config)
    try:
        with _without_load_report():
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                where, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True, device_map=device_map, output_loading_info=True,
            )
        _check_weights_match_config(where, config, loading_info)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as error:
        message = first_line(error)
        hint = " (pickle weights are refused unless you pass --allow-pickle)" if "safetensors" in message.lower() else ""
        raise UsageError(f"cannot load model {where!r}: {message}{hint}") from None
    except pickle.UnpicklingError:
        raise UsageError(f"cannot load model {where!r}: its pickle weights hold objects that torch's safe loader "
                         "refuses even with --allow-pickle (they could run code); convert the checkpoint to "
                         "safetensors where you trust it") from None
    except (ValueError, RuntimeError, SafetensorError) as error:
        raise UsageError(f"cannot load model {where!r}: {first_line(error)}; are the weight files intact? "
                         "Download the checkpoint again") from None
    return model, tokenizer


@contextmanager
def _without_load_report() -> Iterator[None]:
    """transformers logs a table of missing and unexpected weights; we refuse every such checkpoint
    with one line (:func:`_check_weights_match_config`), so the table would only bury that line."""
    # a filter, not a higher level: transformers runs extra checks (and logs them) when this
    # logger's level is WARNING or above
    logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _MessageFilter("LOAD REPORT")
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


class _MessageFilter(logging.Filter):
    """Drops the log records whose message contains ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


def _check_weights_match_config(where: str, config: PretrainedConfig, loading_info: dict[str, Any]) -> None:
    """A checkpoint whose config and weights disagree is refused: transformers would initialise the
    missing weights at random (a config that says more layers) or drop the extra ones (fewer), and
    the model would load without a word and compute nonsense."""
    missing, unexpected = sorted(loading_info.get("missing_keys") or ()), sorted(loading_info.get("unexpected_keys") or ())
    if not missing and not unexpected:
        return
    layers = getattr(config, "num_hidden_layers", "?")
    parts = [f"{len(names)} {kind} weight(s), e.g. {names[0]}" for kind, names in
             (("missing", missing), ("unexpected", unexpected)) if names]
    raise UsageError(f"{where}: config.json ({layers} layers) does not match its weight files: {'; '.join(parts)}; "
                     "fix config.json or download the checkpoint again")


def check_hub_id(source: str, *, network: bool) -> None:
    """Refuse, in seconds, a hub id that cannot load: one that is a near-miss of an alias (a typo such
    as ``smolm2-135m`` would otherwise wait a minute on hub retries before failing), or, with
    ``network``, any id while the hub is unreachable and the id is not in the local Hugging Face cache."""
    close = difflib.get_close_matches(source, MODEL_ALIASES, n=1, cutoff=0.8)
    if close:
        raise UsageError(f"model {source!r} is neither a folder nor an alias; did you mean {close[0]}?")
    if not network or hub.offline_requested() or try_to_load_from_cache(source, "config.json") is not None:
        return
    if not hub.hub_reachable(timeout=3.0):
        raise UsageError(f"model {source!r} is not a local folder and the Hugging Face hub cannot be reached; "
                         "check the name and your network, or download it and pass its folder")


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/", "~"))


def _missing_model(source: str) -> UsageError:
    return UsageError(f"model {source!r} does not exist; pass a checkpoint folder, a .gguf file, a hub id or "
                      f"one of the aliases {', '.join(MODEL_ALIASES)}")


def check_gguf_name(gguf_file: str | None) -> str:
    """``gguf_file`` is a file name inside the model folder, nothing more: a path with separators or
    ``..`` would let a recipe (or a typo) read a file outside the folder it names."""
    name = str(gguf_file)
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).name != name:
        raise OptionError.about("gguf_file", f"{name!r} must be a file name inside the model folder, not a path; "
                                             "give the .gguf file itself as the model to load one from elsewhere")
    return name


def read_local_config(name_or_path: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False,
                      allow_pickle: bool = False) -> PretrainedConfig | None:
    """The config of a local checkpoint folder (or of an alias already in the cache), refused as
    :func:`load_model` refuses it but without reading any weights, so a caller such as a recipe can
    check layer indices before its first stage starts.

    None where the config would cost a download or a GGUF file (a hub id, an alias not yet fetched,
    a ``.gguf``); a local path that does not exist is refused as :func:`load_model` refuses it.
    """
    if gguf_file:
        check_gguf_name(gguf_file)
    source = str(name_or_path)
    alias = MODEL_ALIASES.get(source)
    folder = alias_checkpoint_dir(alias) if alias is not None else Path(source).expanduser()
    if gguf_file or folder.suffix == ".gguf" or (alias is not None and not (folder / "config.json").is_file()):
        return None
    if not folder.exists():
        if _is_hub_id(source):
            check_hub_id(source, network=False)
            return None
        raise _missing_model(source)
    _check_local_folder(folder, allow_pickle)
    return read_config(str(folder), trust_remote_code=trust_remote_code)
