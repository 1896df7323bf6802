"""``layerprune search``: the best smaller model for a layer or speed budget, with its Pareto front.

Every metric x strategy selection, de-duplicated, each with every training-free repair that
applies, ranked on held-out text; the winner is saved as a standard checkpoint beside
``search.json``, ``search.md``, ``pareto.png`` and a ``recipe.yaml`` that ``layerprune run`` replays.
"""

from __future__ import annotations

import argparse

from layerprune.cli.options import (
    add_calibration_options,
    calibration_from_args,
    add_command,
    add_model_options,
    add_output_options,
    check_calibration_args,
    input_paths,
    metric_options_from_args,
    remove_check,
)
from layerprune.outputs import check_output_path
from layerprune.searching import DropRule, check_budget, search
from layerprune.searching.search import DEFAULT_REMOVE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "search", "Find the best smaller model for a layer or speed budget.")
    add_model_options(parser)
    add_output_options(parser)
    budget = parser.add_argument_group("budget")
    default = DEFAULT_REMOVE.replace("%", "%%")  # argparse formats help with %
    budget.add_argument("--remove", help=f"layers to remove: a count (8) or a share (25%%); default {default} unless "
                                         "--target-speedup is given")
    budget.add_argument("--target-speedup", type=float, metavar="X",
                        help="instead of --remove: the fewest layers whose removal gives a measured decode speed-up "
                             "of X over the original")
    budget.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="stop trying new candidates after this many minutes (the best so far wins)")
    budget.add_argument("--max-candidates", type=int, metavar="N", help="rank at most N candidates, cheapest first")
    ranking = parser.add_argument_group("ranking")
    ranking.add_argument("--rank-data", help="held-out text to rank on (default: another split of --data; needed "
                                             "when --data is a local file, which has no split)")
    ranking.add_argument("--rank-windows", type=int, default=16, help="held-out windows of --seq-len tokens")
    ranking.add_argument("--drop-factor", type=float, default=DropRule.factor,
                         help="drop a candidate whose running perplexity exceeds this times the best so far "
                              "(0: never drop)")
    ranking.add_argument("--drop-after", type=int, default=DropRule.after,
                         help="windows a candidate is scored on before it can be dropped")
    ranking.add_argument("--no-repair", action="store_true", help="rank plain cuts only (no training-free repair)")
    ranking.add_argument("--exhaustive", action="store_true",
                         help="also the iterative selections of the costly metrics (ppl: SLEB; taylor), which re-score "
                              "the model after every removal: each costs about --remove times that metric's scoring")
    parser.add_argument("--heal", metavar="METHOD", help="heal the winner only with this method (e.g. lora), on --data")
    add_calibration_options(parser)
    parser.set_defaults(run=run)


def search_calibration(args: argparse.Namespace) -> dict[str, object]:
    """The calibration flags as :func:`layerprune.search`'s keywords (it names the source ``data``)."""
    calibration = calibration_from_args(args).model_dump()
    return {"data": calibration.pop("source"), **calibration}


def run(args: argparse.Namespace) -> int:
    remove = check_budget(args.remove, args.target_speedup, args.time_budget, args.max_candidates)
    check_calibration_args(args)
    check_output_path(args.out, overwrite=args.overwrite, protected=input_paths(args))
    load_options = {"gguf_file": args.gguf_file, "dtype": args.dtype, "device": args.device,
                    "device_map": args.device_map, "trust_remote_code": args.trust_remote_code,
                    "allow_pickle": args.allow_pickle,
                    "check_config": remove_check(remove if args.target_speedup is None else None)}
    record = search(
        args.model, args.remove, target_speedup=args.target_speedup, **search_calibration(args),
        batch_size=args.batch_size, metric_options=metric_options_from_args(args),
        rank_data=args.rank_data, rank_windows=args.rank_windows,
        drop_rule=DropRule(after=args.drop_after, factor=args.drop_factor), repairs=not args.no_repair,
        exhaustive=args.exhaustive,
        heal=args.heal, time_budget=args.time_budget, max_candidates=args.max_candidates, out=args.out,
        overwrite=args.overwrite, load_options=load_options,
    )
    winner = record.winner
    print(f"winner: {winner.label}, removes layers {winner.candidate.remove}, held-out ppl {winner.ppl:.2f}, "
          f"decode speed-up {winner.measured_speedup:.2f}x (FLOP-ideal {winner.ideal_speedup:.2f}x); "
          f"{len(record.tried)} candidates in {record.seconds:.0f} s; saved to {record.out}")
    return 0
