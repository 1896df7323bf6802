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
    metric_options_from_args, remove_check, safetensors_folder, score_and_select, selection_strategy,
    warn_if_most_layers_go,
)
from layerprune.errors import UsageError
from layerprune.reporting.scores import format_table, plot_scores
from layerprune.scoring import METRICS, ScoreReport, check_metrics
from layerprune.scoring.report import needs_data
from layerprune.scoring.streaming import check_streamable, open_streaming, stream_score
from layerprune.outputs import check_output_file, check_scratch_folder, write_json_atomic
from layerprune.selection import STRATEGIES, select


def stream_from_args(args: argparse.Namespace, metrics: list[str], strategy: str,
                     check_layers: Callable[[PretrainedConfig], None]) -> ScoreReport:
    """``--streaming``: :func:`layerprune.scoring.streaming.stream_score`; the model is never whole in memory."""
    check_streamable(metrics)
    if STRATEGIES.get(strategy).rescores:
        raise UsageError(f"--strategy {strategy} re-scores the pruned model in memory; drop it or drop --streaming")
    folder = safetensors_folder(args, "--streaming")
    skeleton = open_streaming(folder)
    check_layers(skeleton.model.config)
    calibration = build_calibration_from_args(skeleton, args) if needs_data(metrics) else None
    return stream_score(folder, calibration, metrics, batch_size=args.batch_size, **metric_options_from_args(args),
                        dtype=args.dtype, spill_dir=args.spill_dir, tokenizer=skeleton.tokenizer,
                        data=calibration_from_args(args).record() if calibration is not None else None)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "score", "Score how important each layer is, and pick the layers to remove.")
    add_model_options(parser)
    parser.add_argument("--metrics", default="bi",
                        help=f"comma-separated metrics (default: bi); one of: {', '.join(METRICS.names())}")
    add_calibration_options(parser)
    add_selection_options(parser, required=False)
    parser.add_argument("--select-by", help="the metric that picks the layers to remove (default: the first)")
    add_output_file_options(parser, required=False, what="write the scores as JSON here (and the figure beside it "
                                                         "as .png)", overwrite="replace the --output and --plot files, only ones layerprune "
                                                                   "wrote (recognised by their content)")
    parser.add_argument("--plot", metavar="FILE", help="write the figure here (default: --output with .png)")
    parser.add_argument("--streaming", action="store_true",
                        help="load one decoder layer at a time from the safetensors files (for models that do not "
                             "fit in memory; CPU); not for taylor or --iterative")
    parser.add_argument("--spill-dir", help="with --streaming: keep activations between layers in files here "
                                            "instead of memory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    metrics = check_metrics(args.metrics)
    check_calibration_args(args)
    strategy = selection_strategy(args)
    select_by = args.select_by or metrics[0]
    if select_by not in metrics:
        raise UsageError(f"--select-by {select_by} is not among --metrics {','.join(metrics)}; add it to --metrics")
    if args.remove is None and (args.iterative or args.strategy != "independent" or args.select_by):
        raise UsageError("--strategy/--iterative/--select-by choose layers to remove; say how many with --remove")
    check_layers = remove_check(args.remove)
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
        report = stream_from_args(args, metrics, strategy, check_layers)
        selection = select(report, args.remove, strategy, select_by) if args.remove is not None else None
        if selection is not None:
            warn_if_most_layers_go(args, len(selection.remove), report.num_layers)
    else:
        report, selection = score_and_select(load_from_args(args, check_config=check_layers), args, metrics,
                                             strategy, select_by)
    if selection is not None:
        warn_if_most_layers_go(args, len(selection.remove), report.num_layers)
    print(format_table(report, selection))
    if output is not None:
        write_json_atomic(output, report.to_json(selection), overwrite=args.overwrite)
        print(f"scores written to {output}")
    if plot is not None:
        plot_scores(report, plot, selection, overwrite=args.overwrite)
        print(f"figure written to {plot}")
    return 0
