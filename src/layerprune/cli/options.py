"""Command-line options shared by several subcommands, defined once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from transformers import PretrainedConfig

from layerprune.errors import UsageError
from layerprune.models.aliases import MODEL_ALIASES, alias_checkpoint_dir, resolve_alias
from layerprune.models.loading import LoadedModel, load_model


def add_model_options(parser: argparse.ArgumentParser, *, default: str | None = "smollm2-135m") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, required=default is None,
                       help="alias (smollm2-135m, gemma3-270m), checkpoint folder, .gguf file or hub id"
                            + (f" (default: {default})" if default else ""))
    group.add_argument("--gguf-file", help="GGUF file name inside the --model folder")
    group.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (float32 on CPU)")
    group.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    group.add_argument("--device-map", help="auto | balanced | sequential: spread the model over all GPUs and the "
                                            "CPU with accelerate (overrides --device)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow running the model repository's own Python code (off by default)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow loading pickle weights (.bin/.pt), which can run code (off by default)")


def load_from_args(
    args: argparse.Namespace, check_config: Callable[[PretrainedConfig], None] | None = None
) -> LoadedModel:
    return load_model(
        args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, check_config=check_config,
        device_map=args.device_map,
    )


def input_folders(args: argparse.Namespace) -> list[Path]:
    """The local folders ``--model`` reads from, known without loading it.

    Outputs must never land in them; checking this before the load (and not only at save time)
    makes ``--out`` pointing into the model fail in the first second.
    """
    if args.model in MODEL_ALIASES:
        return [alias_checkpoint_dir(MODEL_ALIASES[args.model])]
    path = Path(args.model).expanduser()
    if path.is_file():  # a .gguf file: its folder holds the input
        return [path.parent]
    return [path] if path.is_dir() else []


def add_output_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--out", required=required, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def safetensors_folder(args: argparse.Namespace, flag: str) -> Path:
    """The local safetensors checkpoint ``--model`` names, for ``flag`` (``--low-memory``,
    ``--streaming``), which read the weight files directly instead of loading the model."""
    from layerprune.models.shards import is_safetensors_checkpoint

    folder = resolve_alias(args.model) if args.model in MODEL_ALIASES else Path(args.model).expanduser()
    if not is_safetensors_checkpoint(folder):
        raise UsageError(f"{flag} needs a local safetensors checkpoint folder and {args.model!r} is not one; "
                         f"download it first or drop {flag}")
    return folder
