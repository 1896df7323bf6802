"""``layerprune prune``: remove layers and export a standard checkpoint."""

from __future__ import annotations

import argparse

import torch

from layerprune.api import prune, save
from layerprune.cli.options import add_model_options, add_output_options, input_folders, load_from_args
from layerprune.errors import UsageError
from layerprune.models.surgery import parse_layer_list, validate_layer_indices
from layerprune.outputs import check_output_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prune", help="remove decoder layers and save a standard checkpoint")
    add_model_options(parser)
    parser.add_argument("--layers", help="layer indices to remove, e.g. 25,26,27 or 20-27")
    add_output_options(parser)
    parser.add_argument("--generate", metavar="PROMPT", help="after pruning, greedily continue PROMPT and print it")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="length of the --generate continuation")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.layers:
        raise UsageError("say which layers to remove with --layers (e.g. --layers 25,26,27)")
    layers = parse_layer_list(args.layers)
    validate_layer_indices(layers)  # empty, negative, repeated: no model needed to tell
    if args.generate and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_output_path(args.out, overwrite=args.overwrite, protected=input_folders(args))
    loaded = load_from_args(
        args, check_config=lambda config: validate_layer_indices(layers, getattr(config, "num_hidden_layers", None))
    )
    removed = prune(loaded, layers)
    folder = save(loaded, args.out, overwrite=args.overwrite)
    print(f"removed layers {removed}: {loaded.lineage['original_num_layers']} -> {loaded.num_layers} layers; saved to {folder}")
    if args.generate:
        print(generate_text(loaded, args.generate, args.max_new_tokens))
    return 0


def generate_text(loaded, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt``: a quick sanity check that the pruned model still speaks."""
    inputs = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.model.device)
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(output[0], skip_special_tokens=True)
