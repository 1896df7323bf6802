"""``layerprune heal``: train a pruned model back towards the original and export it."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from layerprune.api import save
from layerprune.cli.options import add_command, add_model_options, add_output_options, load_from_args
from layerprune.distributed import process_state
from layerprune.errors import UsageError
from layerprune.healing import HEALERS, HealSettings, heal
from layerprune.healing.engine import STATE_FILE
from layerprune.models.surgery import parse_layer_list
from layerprune.outputs import check_output_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "heal", "Heal a pruned model by training it back towards the original "
                                             "(replacement, partial fine-tuning, LoRA) and save it.")
    add_model_options(parser)
    parser.add_argument("--method", required=True, choices=HEALERS.names(), help="healing method")
    parser.add_argument("--data", required=True,
                        help="training text (wiki-sample, news-sample, a file, a hub name: train split) or an "
                             "Alpaca JSON/JSONL instruction file (loss on the response only)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch: sequences per step (default: 8)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: per method)")
    parser.add_argument("--samples", type=int, help="training sequences to draw (default: steps x batch size)")
    parser.add_argument("--seed", type=int, default=0, help="data sampling and batch order seed")
    parser.add_argument("--train-layers", type=int, default=3, help="partial-ft: last K layers to train (default: 3)")
    parser.add_argument("--lora-rank", type=int, default=16, help="lora/qlora: adapter rank (default: 16)")
    parser.add_argument("--distill", action="store_true",
                        help="partial-ft/lora/qlora: add KL to the unpruned model's logits")
    parser.add_argument("--distill-weight", type=float, default=0.5, help="KL share of the loss, 1 = KL only")
    parser.add_argument("--original", help="the unpruned model (default: source_model of --model's layerprune.json)")
    parser.add_argument("--block", help="replace-*: the removed run to replace, original indices, e.g. 20-27 "
                                        "(default: read from layerprune.json)")
    parser.add_argument("--checkpoint-dir", help="where training checkpoints go (default: OUT.heal-checkpoints)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps (0 = never)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on capable GPUs) | fp32 | bf16")
    add_output_options(parser)
    parser.set_defaults(run=run)


def parse_block(text: str) -> tuple[int, int]:
    """``"20-27"`` (inclusive, like --layers) -> the half-open run ``(20, 28)``."""
    indices = parse_layer_list(text)
    if len(indices) < 2 or indices != list(range(indices[0], indices[-1] + 1)):
        raise UsageError(f"--block {text!r} must be a range of at least two consecutive layers, e.g. 20-27")
    return indices[0], indices[-1] + 1


def run(args: argparse.Namespace) -> int:
    block = parse_block(args.block) if args.block else None
    protected = [Path(p) for p in (args.model, args.original) if p and Path(p).expanduser().exists()]
    out = check_output_path(args.out, overwrite=args.overwrite, protected=protected)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".heal-checkpoints")
    options = dict(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seq_len=args.seq_len, samples=args.samples,
        seed=args.seed, train_layers=args.train_layers, lora_rank=args.lora_rank, distill=args.distill,
        distill_weight=args.distill_weight, block=block, checkpoint_dir=checkpoints,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
    )
    HealSettings(method=args.method, data=args.data, **options).check()  # fail before loading anything
    healed = heal(load_from_args(args), args.method, args.data, original=args.original, **options)
    if not process_state().is_main_process:
        return 0
    folder = save(healed, out, overwrite=args.overwrite)
    (checkpoints / STATE_FILE).unlink(missing_ok=True)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        shutil.rmtree(checkpoints)
    step = healed.lineage["healing"][-1]
    print(f"healed with {args.method}: loss {step['first_loss']:.4g} -> {step['final_loss']:.4g} over {step['steps']} "
          f"steps ({step['train_seconds']} s, {step['trainable_parameters']:,} trainable parameters); saved to {folder}")
    return 0
