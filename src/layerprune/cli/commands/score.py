"""``layerprune score``: how important is each layer, and which ones would go.

Also defines the calibration and selection options that ``layerprune prune --metric`` shares, so
both commands accept the same flags with the same defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Callable
from typing import Any

from transformers import PretrainedConfig

from layerprune.cli.options import add_model_options, input_folders, load_from_args, safetensors_folder
from layerprune.data import SAMPLINGS
from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.reporting.scores import format_table, plot_scores
from layerprune.options import add_option_flags, options_of
from layerprune.scoring import METRICS, ScoreReport, check_metrics, rescorer, score
from layerprune.scoring.base import metric_options
from layerprune.scoring.report import needs_data
from layerprune.scoring.streaming import check_streamable, open_streaming, stream_score
from layerprune.outputs import write_json_atomic
from layerprune.selection import STRATEGIES, Selection, check_remove, check_strategy, parse_remove, select


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration data (for metrics that run the model)")
    group.add_argument("--data", default="wiki-sample",
                       help="wiki-sample | news-sample (offline), a local text/JSON/JSONL/CSV file, or a hub dataset "
                            "name when online (default: wiki-sample)")
    group.add_argument("--text-field", help="the field holding the text in a JSON/CSV/hub dataset")
    group.add_argument("--split", default="train", help="data split to draw from (default: train)")
    group.add_argument("--samples", type=int, default=64, help="calibration rows (default: 64)")
    group.add_argument("--seq-len", type=int, default=256, help="tokens per row (default: 256)")
    group.add_argument("--batch-size", type=int,
                       help="rows per forward pass (default: 8; 1 with --streaming, whose point is low memory)")
    group.add_argument("--seed", type=int, default=0, help="seed for sampling windows and the random metric")
    group.add_argument("--sampling", default="random", choices=SAMPLINGS.names(),
                       help="random windows (default), contiguous windows from the start of the text, or one "
                            "padded window per document")
    add_option_flags(parser.add_argument_group("metric options (each read by the metrics that declare it)"),
                     *metric_options_classes(), skip=("seed",))  # --seed above also seeds the data


def metric_options_classes() -> list[type]:
    """The options classes the registered metrics declare, each once."""
    return list(dict.fromkeys(c for c in (METRICS.get(n).options_class for n in METRICS) if c is not None))


def metric_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The value of every metric option on the command line (flags, and --seed for ``random``)."""
    return {o.name: getattr(args, o.name) for c in metric_options_classes() for o in options_of(c)}


def add_selection_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("selection")
    group.add_argument("--remove", required=required, help="layers to remove: a count (8) or a share (25%%)")
    group.add_argument("--strategy", default="independent", choices=STRATEGIES.names(),
                       help="independent: the N least important layers (ShortGPT); consecutive: the best run of N "
                            "layers (LLM-Streamline, Gromov); iterative: remove one, re-score, repeat (SLEB)")
    group.add_argument("--iterative", action="store_true", help="same as --strategy iterative")


def check_calibration_args(args: argparse.Namespace) -> None:
    """Refuse impossible sizes before any model or data is loaded (and fill in the default batch)."""
    if args.batch_size is None:
        args.batch_size = 1 if getattr(args, "streaming", False) else 8
    for flag in ("samples", "seq_len", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 to have a next token to predict, got {args.seq_len}")
    metric_options([], metric_options_from_args(args))
    from layerprune.data import check_source  # reads no data: a mistyped --data fails before the model loads

    check_source(args.data, args.split)


def selection_strategy(args: argparse.Namespace) -> str:
    if args.iterative and args.strategy not in ("independent", "iterative"):
        raise UsageError(f"--iterative contradicts --strategy {args.strategy}; give one of them")
    return check_strategy("iterative" if args.iterative else args.strategy)


def remove_check(remove: str | None) -> Callable[[PretrainedConfig], None]:
    """A ``check_config`` hook: validate ``--remove`` against the layer count before loading weights."""
    if remove is not None:
        check_remove(remove)

    def check(config: PretrainedConfig) -> None:
        layers = getattr(config, "num_hidden_layers", None)
        if remove is not None and layers:
            parse_remove(remove, layers)

    return check


def build_calibration_from_args(loaded: LoadedModel, args: argparse.Namespace) -> Any:
    from layerprune import data  # looked up at call time, so tests can stand in for the data layer

    return data.build_calibration(loaded.tokenizer, args.data, split=args.split, samples=args.samples,
                                  seq_len=args.seq_len, seed=args.seed, sampling=args.sampling,
                                  text_field=args.text_field,
                                  max_positions=getattr(loaded.model.config, "max_position_embeddings", None))


def data_description(args: argparse.Namespace) -> dict[str, Any]:
    return {"source": args.data, "split": args.split, "text_field": args.text_field, "samples": args.samples,
            "seq_len": args.seq_len, "sampling": args.sampling}


def score_and_select(loaded: LoadedModel, args: argparse.Namespace, metrics: list[str], strategy: str,
                     select_by: str) -> tuple[ScoreReport, Selection | None]:
    """Score ``loaded`` as the calibration flags say (loading data only if a metric needs it) and,
    with ``--remove``, choose the layers by ``select_by``; iterative selection re-scores the same way."""
    calibration = build_calibration_from_args(loaded, args) if needs_data(metrics) else None
    options = dict(batch_size=args.batch_size, **metric_options_from_args(args))
    report = score(loaded, calibration, metrics, data=data_description(args) if calibration is not None else None,
                   **options)
    if args.remove is None:
        return report, None
    return report, select(report, args.remove, strategy, select_by, rescore=rescorer(loaded, calibration, **options))


def stream_from_args(args: argparse.Namespace, metrics: list[str], strategy: str,
                     check_layers: Callable[[PretrainedConfig], None]) -> ScoreReport:
    """``--streaming``: :func:`layerprune.scoring.streaming.stream_score`; the model is never whole in memory."""
    check_streamable(metrics)
    if strategy == "iterative":
        raise UsageError("--iterative re-scores the pruned model in memory; drop it or drop --streaming")
    folder = safetensors_folder(args, "--streaming")
    skeleton = open_streaming(folder)
    check_layers(skeleton.model.config)
    calibration = build_calibration_from_args(skeleton, args) if needs_data(metrics) else None
    return stream_score(folder, calibration, metrics, batch_size=args.batch_size, **metric_options_from_args(args),
                        dtype=args.dtype, spill_dir=args.spill_dir, tokenizer=skeleton.tokenizer,
                        data=data_description(args) if calibration is not None else None)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("score", help="score layer importance and pick the layers to remove")
    add_model_options(parser)
    parser.add_argument("--metrics", default="bi",
                        help=f"comma-separated metrics (default: bi); one of: {', '.join(METRICS.names())}")
    add_calibration_options(parser)
    add_selection_options(parser, required=False)
    parser.add_argument("--select-by", help="the metric that picks the layers to remove (default: the first)")
    parser.add_argument("--output", help="write the scores as JSON here (and the figure beside it as .png)")
    parser.add_argument("--plot", help="write the figure here (default: --output with .png)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --output/--plot files")
    parser.add_argument("--streaming", action="store_true",
                        help="load one decoder layer at a time from the safetensors files (for models that do not "
                             "fit in memory; CPU); not for taylor or --iterative")
    parser.add_argument("--spill-dir", help="with --streaming: keep activations between layers in files here "
                                            "instead of memory")
    parser.set_defaults(run=run)


def _check_file_output(path: Path | None, overwrite: bool, protected: list[Path]) -> None:
    if path is None:
        return
    target = path.expanduser().resolve()
    for folder in protected:
        if folder.resolve() in target.parents:
            raise UsageError(f"output {target} lies inside the input model folder {folder}; write it elsewhere")
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; choose a new path or pass --overwrite")
    if target.is_dir():
        raise UsageError(f"{target} is a folder; give a file name such as scores.json")


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
    output = Path(args.output) if args.output else None
    plot = Path(args.plot) if args.plot else (output.with_suffix(".png") if output else None)
    for path in (output, plot):
        _check_file_output(path, args.overwrite, input_folders(args))
    if args.streaming:
        report = stream_from_args(args, metrics, strategy, check_layers)
        selection = select(report, args.remove, strategy, select_by) if args.remove is not None else None
    else:
        report, selection = score_and_select(load_from_args(args, check_config=check_layers), args, metrics,
                                             strategy, select_by)
    print(format_table(report, selection))
    if output is not None:
        write_json_atomic(output, report.to_json(selection), overwrite=args.overwrite)
        print(f"scores written to {output}")
    if plot is not None:
        plot_scores(report, plot, selection, overwrite=args.overwrite)
        print(f"figure written to {plot}")
    return 0
