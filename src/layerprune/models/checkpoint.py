"""A checkpoint folder's config and weight index, read and checked before anything is built.

Loading a model allocates what its config says; a config whose layer count is a string, a float, a
bool or ``1e12`` would otherwise end in a TypeError deep inside transformers, or in an allocation that
hangs or is killed for memory. So the config is read here (with transformers' own validation, its
errors said in one line), its layer count is checked against the weights present (each layer holds at
least one tensor, read from the index or the safetensors headers: no weight is loaded), and a sharded
checkpoint's index must map tensor names to file names.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig

from layerprune.errors import OptionError, UsageError
from layerprune.models.architectures import check_supported_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
REDOWNLOAD = "download the checkpoint again"
INTACT = f"are the weight files intact? {REDOWNLOAD}"


def read_config(where: str | Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a folder or hub id, refused if it is unreadable, malformed or not a causal LM's;
    for a local folder its layer count is also checked against the weight files (:func:`check_layer_count`)."""
    where = str(where)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, StrictDataclassError) as error:
        if "trust_remote_code" in str(error):
            raise OptionError.about("trust_remote_code", f"is off, but {where} needs custom code from its "
                                                         "repository to load; turn it on only if you trust that "
                                                         "code") from None
        raise UsageError(f"cannot read the config of {where}: {_one_line(error)}; fix config.json or "
                         f"{REDOWNLOAD}") from None
    except OSError as error:
        if Path(where).is_dir():
            raise UsageError(f"cannot read {Path(where) / 'config.json'} ({_one_line(error)}); fix the file or "
                             f"{REDOWNLOAD}") from None
        raise UsageError(f"cannot load model {where!r}: not a local folder, and the Hugging Face hub did not "
                         f"provide it ({_one_line(error)}); check the name or your network") from None
    check_supported_config(config)
    if Path(where).is_dir():
        check_layer_count(Path(where), config)
    return config


def _one_line(error: BaseException) -> str:
    """A library's message with its lines joined: transformers' validation says the field on one line
    and the reason (``expected int, got bool``) on the next."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def check_layer_count(folder: Path, config: PretrainedConfig) -> None:
    """Refuse a layer count that is not a positive whole number, or more layers than the weight files
    could hold (at least one tensor each), before a model of that size is allocated."""
    text_config = config.get_text_config()
    layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise UsageError(f"{folder / 'config.json'}: num_hidden_layers must be a positive whole number, got "
                         f"{layers!r}; fix config.json or {REDOWNLOAD}")
    tensors = tensor_count(folder)
    if tensors is not None and layers > tensors:
        raise UsageError(f"{folder / 'config.json'}: num_hidden_layers is {layers:,}, but the weight files hold only "
                         f"{tensors:,} tensors (every layer has at least one); fix config.json or {REDOWNLOAD}")


def weight_map(folder: Path) -> dict[str, str] | None:
    """The index of a sharded safetensors checkpoint: tensor name -> file name inside ``folder``
    (None without an index); refused when it is not such a mapping."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"{path} is unreadable or has no weight_map; {REDOWNLOAD}") from None
    if not isinstance(mapping, dict) or not all(
            isinstance(name, str) and isinstance(file, str) and file and Path(file).name == file
            for name, file in mapping.items()):
        raise UsageError(f"{path}: weight_map must map each tensor name to a file name in the folder; "
                         f"{REDOWNLOAD}")
    return mapping


def tensor_count(folder: Path) -> int | None:
    """How many tensors the safetensors weights of ``folder`` hold, from the index or the files' headers
    (None where there are none to read: pickle weights are never opened here)."""
    mapping = weight_map(folder)
    if mapping is not None:
        return len(mapping)
    files = sorted(folder.glob("*.safetensors"))
    return sum(len(_header_names(path)) for path in files) if files else None


def _header_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (its 8-byte length, then JSON)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(length)
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        raise UsageError(f"{path} is not a valid safetensors file (unreadable header); {INTACT}") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path} is not a valid safetensors file (header is not a JSON object); {INTACT}")
    return [name for name in header if name != "__metadata__"]
