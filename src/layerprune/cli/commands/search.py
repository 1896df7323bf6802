"""``layerprune search``: the best smaller model for a layer or speed budget, with its Pareto front.

Every metric x strategy selection, de-duplicated, each with every training-free repair that
applies, ranked on held-out text; the winner is saved as a standard checkpoint beside
``search.json``, ``search.md``, ``pareto.png`` and a ``recipe.yaml`` that ``layerprune run`` replays.
The search's flags are :class:`~layerprune.searching.SearchConfig`'s declarations (``--batch-size``
is the calibration group's, shared with the other commands that score, and read only where given).
"""

from __future__ import annotations

import argparse

from layerprune.cli.options import (
    add_calibration_options,
    add_command,
    add_model_options,
    add_output_options,
    calibration_from_args,
    check_calibration_args,
    export_from_args,
    input_paths,
    metric_options_from_args,
    remove_check,
)
from layerprune.options import add_option_flags, given_options
from layerprune.outputs import check_output_path
from layerprune.searching import SearchConfig, search
from layerprune.searching.report import speedup_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "search", "Find the best smaller model for a layer or speed budget.")
    add_model_options(parser)
    add_output_options(parser)
    # --seed is the calibration group's: one seed for the windows and the evolution (given_options reads it)
    add_option_flags(parser.add_argument_group("search: budget, ranking, the winner"), SearchConfig,
                     skip=("batch_size", "seed"))
    add_calibration_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_calibration_args(args)
    config = SearchConfig(**given_options(args, SearchConfig))
    export = export_from_args(args)
    check_output_path(args.out, overwrite=args.overwrite, protected=input_paths(args))
    load_options = {"gguf_file": args.gguf_file, "dtype": args.dtype, "device": args.device,
                    "device_map": args.device_map, "trust_remote_code": args.trust_remote_code,
                    "allow_pickle": args.allow_pickle, "check_config": remove_check(config.removal)}
    record = search(args.model, config, calibration=calibration_from_args(args),
                    metric_options=metric_options_from_args(args), out=export.out, overwrite=export.overwrite,
                    export_options=export.written(), load_options=load_options)
    winner = record.winner
    print(f"winner: {winner.label}, removes {winner.candidate.removed}, held-out ppl {winner.ppl:.2f}, "
          f"decode speed-up {speedup_text(winner.speed)} (measured / FLOP-ideal); "
          f"{len(record.tried)} candidates in {record.seconds:.0f} s; saved to {record.out}"
          + (f"; {record.shortfall}" if record.shortfall else ""))
    return 0
