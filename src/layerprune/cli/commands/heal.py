"""``layerprune heal``: train a pruned model back towards the original and export it."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from layerprune.api import save
from layerprune.cli.options import (
    add_command, add_model_options, add_output_options, export_from_args, input_paths, load_from_args,
)
from layerprune.distributed import process_state
from layerprune.errors import UsageError
from layerprune.healing import HEALERS, heal
from layerprune.healing.base import HealConfig, TrainingOptions
from layerprune.healing.engine import STATE_FILE
from layerprune.models.lineage import read_lineage
from layerprune.options import add_option_flags, declaration, given_options, options_of
from layerprune.outputs import check_output_path, check_scratch_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "heal", "Heal a pruned model by training it back towards the original "
                                             "(replacement, partial fine-tuning, LoRA) and save it.")
    add_model_options(parser)
    # --method and --data are required here, which a declaration is not; --checkpoint-dir has a default of its own
    parser.add_argument("--method", required=True, choices=HEALERS.names(), help="healing method")
    parser.add_argument("--data", required=True, help=declaration(HealConfig, "data").help)
    parser.add_argument("--checkpoint-dir", help="where training checkpoints go (default: OUT.heal-checkpoints)")
    add_option_flags(parser, HealConfig, skip=("method", "data", "checkpoint_dir"))  # --original, --resume
    add_option_flags(parser.add_argument_group("training (every method)"), TrainingOptions, only_given=True)
    for methods, names in method_option_groups().items():
        options_class = HEALERS.get(methods[0]).options_class
        add_option_flags(parser.add_argument_group(f"{', '.join(methods)} only"), options_class, only_given=True,
                         skip=[o.name for o in options_of(options_class) if o.name not in names])
    add_output_options(parser)
    parser.set_defaults(run=run)


def method_option_groups() -> dict[tuple[str, ...], list[str]]:
    """The methods' own options grouped by the methods that take them ({("lora", "qlora"): ["lora_rank"]}),
    so each flag is added once and the help says which methods read it."""
    takers: dict[str, list[str]] = {}
    for method in HEALERS.names():
        for option in options_of(HEALERS.get(method).options_class):
            takers.setdefault(option.name, []).append(method)
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, methods in takers.items():
        groups.setdefault(tuple(methods), []).append(name)
    return groups


def run(args: argparse.Namespace) -> int:
    protected = input_paths(args)
    if not args.original:  # heal reads the original the pruned model's lineage names: an input too
        source = Path(str(read_lineage(Path(args.model).expanduser()).get("source_model", ""))).expanduser()
        protected += [source] if source.name and source.exists() else []
    out = check_output_path(args.out, overwrite=args.overwrite, protected=protected)
    checkpoints = check_scratch_folder(args.checkpoint_dir or out.with_name(out.name + ".heal-checkpoints"),
                                       protected=protected, flag="--checkpoint-dir")
    if checkpoints == out or out in checkpoints.parents:
        raise UsageError(f"--checkpoint-dir {checkpoints} lies inside --out {out}, which is replaced when the healed "
                         "model is saved; choose a checkpoint folder outside --out")
    # only the flags given: the declarations hold the defaults, and HealConfig refuses another method's flag
    flat = given_options(args, TrainingOptions)
    for method in HEALERS.names():
        flat.update(given_options(args, HEALERS.get(method).options_class))
    config = HealConfig(**{**given_options(args, HealConfig), **flat, "checkpoint_dir": checkpoints})
    export = export_from_args(args)  # both fail before anything is loaded
    if config.self_generated:
        config.check_inputs()  # a missing --prompts source too
    healed = heal(load_from_args(args), config)
    if not process_state().is_main_process:
        return 0
    folder = save(healed, **export.model_dump())
    (checkpoints / STATE_FILE).unlink(missing_ok=True)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        shutil.rmtree(checkpoints)
    step = healed.lineage["healing"][-1]
    if "steps" not in step:  # a training-free repair: nothing was trained
        print(f"repaired with {args.method} in {step['train_seconds']} s: {step['summary']}; saved to {folder}")
        return 0
    print(f"healed with {args.method}: loss {step['first_loss']:.4g} -> {step['final_loss']:.4g} over {step['steps']} "
          f"steps ({step['train_seconds']} s, {step['trainable_parameters']:,} trainable parameters); saved to {folder}")
    return 0
