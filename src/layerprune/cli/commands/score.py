"""``layerprune score``: how important is each layer, and which ones would go.

Its calibration and selection flags live in :mod:`layerprune.cli.options`, shared with
``layerprune prune --metric``, so both commands accept the same flags with the same defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Callable

from transformers import PretrainedConfig

from layerprune.cli.options import (
    add_calibration_options, add_command, add_model_options, add_output_file_options, add_selection_options,
    build_calibration_from_args, calibration_from_args, check_calibration_args, input_paths, load_from_args,
    metric_options_from_args, remove_check, safetensors_folder, score_and_select, scoring_from_args,
    selection_from_args, warn_if_most_layers_go,
)
from layerprune.errors import UsageError
from layerprune.options import add_option_flags
from layerprune.reporting.scores import format_table, plot_scores
from layerprune.scoring import ScoreConfig, ScoreReport
from layerprune.scoring.report import needs_data
from layerprune.scoring.streaming import check_streamable, open_streaming, stream_score
from layerprune.outputs import check_output_file, check_scratch_folder, write_json_atomic
from layerprune.selection import DEFAULT_SELECT, STRATEGIES, select


def stream_from_args(args: argparse.Namespace, scoring: ScoreConfig, strategy: str,
                     check_layers: Callable[[PretrainedConfig], None]) -> ScoreReport:
    """``--streaming``: :func:`layerprune.scoring.streaming.stream_score`; the model is never whole in memory."""
    check_streamable(scoring)
    if STRATEGIES.get(strategy).rescores:
        raise UsageError(f"--strategy {strategy} re-scores the pruned model in memory; drop it or drop --streaming")
    folder = safetensors_folder(args, "--streaming")
    skeleton = open_streaming(folder)
    check_layers(skeleton.model.config)
    calibration = build_calibration_from_args(skeleton, args) if needs_data(scoring.metrics) else None
    return stream_score(folder, calibration, **dict(scoring), **metric_options_from_args(args),
                        dtype=args.dtype, spill_dir=args.spill_dir, tokenizer=skeleton.tokenizer,
                        data=calibration_from_args(args).record() if calibration is not None else None)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "score", "Score how important each layer is, and pick the layers to remove.")
    add_model_options(parser)
    add_option_flags(parser, ScoreConfig, skip=("batch_size",))  # --metrics; --batch-size is the calibration group's
    add_calibration_options(parser)
    add_selection_options(parser, select_by=True)
    add_output_file_options(parser, required=False, what="write the scores as JSON here (and the figure beside it "
                                                         "as .png)", overwrite="replace the --output and --plot files, only ones layerprune "
                                                                   "wrote (recognised by their content)")
    parser.add_argument("--plot", metavar="FILE", help="write the figure here (default: --output with .png)")
    parser.add_argument("--streaming", action="store_true",
                        help="load one decoder layer at a time from the safetensors files (for models that do not "
                             "fit in memory; CPU); not for taylor or --iterative; --batch-size is then 1 unless given "
                             "(the point is low memory)")
    parser.add_argument("--spill-dir", help="with --streaming: keep activations between layers in files here "
                                            "instead of memory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    scoring = scoring_from_args(args)
    check_calibration_args(args)
    selection = selection_from_args(args)
    if selection.metric is not None and selection.metric not in scoring.metrics:
        raise UsageError(f"--select-by {selection.metric} is not among --metrics {','.join(scoring.metrics)}; add it "
                         "to --metrics")
    if selection.remove is None and (args.iterative or selection.strategy != DEFAULT_SELECT.strategy
                                     or selection.metric):
        raise UsageError("--strategy/--iterative/--select-by choose layers to remove; say how many with --remove")
    check_layers = remove_check(selection.remove)
    inputs = input_paths(args)
    for given, flag in ((args.output, "--output"), (args.plot, "--plot"), (args.spill_dir, "--spill-dir")):
        if given is not None and not given.strip():  # "" would otherwise mean no file, or the current directory
            raise UsageError(f"{flag} is empty; give the path to write, or leave {flag} out")
    output = Path(args.output) if args.output else None
    plot = Path(args.plot) if args.plot else (output.with_suffix(".png") if output else None)
    for path, flag in ((output, "--output"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, overwrite=args.overwrite, protected=inputs, flag=flag)
    if args.spill_dir and not check_scratch_folder(args.spill_dir, protected=inputs, flag="--spill-dir").is_dir():
        raise UsageError(f"--spill-dir {args.spill_dir} does not exist; create it first (the activations go into "
                         "a private folder inside it) or choose an existing folder")
    if args.streaming:
        report = stream_from_args(args, scoring, selection.strategy, check_layers)
        chosen = select(report, **dict(selection)) if selection.remove is not None else None
    else:
        report, chosen = score_and_select(load_from_args(args, check_config=check_layers), args, scoring, selection)
    if chosen is not None and not chosen.units:
        warn_if_most_layers_go(args, len(chosen.remove), report.num_layers)
    print(format_table(report, chosen))
    if output is not None:
        write_json_atomic(output, report.to_json(chosen), overwrite=args.overwrite)
        print(f"scores written to {output}")
    if plot is not None:
        plot_scores(report, plot, chosen, overwrite=args.overwrite)
        print(f"figure written to {plot}")
    return 0
