"""Command-line options shared by several subcommands, defined once, and the conventions every
subcommand follows.

Conventions (tests/core/test_cli.py checks each for every subcommand):

- a subcommand is made with :func:`add_command`, so its help opens with one sentence saying what it does;
- every option with a default shows it in ``--help`` (:class:`layerprune.cli.spec.DefaultsShownFormatter`);
- ``--model`` is required wherever a command works on a model (``layerprune run`` takes it only to override
  the model its recipe names);
- two output flags, on purpose: ``--out FOLDER`` names a folder the command fills (a checkpoint, a run
  folder), ``--output FILE`` names one results file whose companions (``.md``, ``.png``) are written beside
  it. The name tells the user which of the two to give;
- ``--seq-len`` is 256 tokens for the rows that scoring and healing compute on, and 512 for evaluation's
  perplexity windows, on purpose: a perplexity is comparable only with perplexities at the same window, so
  evaluation keeps the window every reported result used, while scoring and healing pay a forward (and for
  healing, a backward) pass per row and use the shorter rows their recipes were run with;
- ``--dtype`` and ``--device`` are checked while the flags are read, before anything is loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from layerprune.data import CalibrationConfig, build_calibration, check_source
from layerprune.errors import OptionError, UsageError
from layerprune.models.aliases import MODEL_ALIASES, alias_checkpoint_dir, resolve_alias
from layerprune.models.export import ExportConfig
from layerprune.models.gguf_export import DEVICE_MAP_REFUSAL
from layerprune.models.loading import LoadedModel, load_model, resolve_dtype
from layerprune.models.shards import is_safetensors_checkpoint
from layerprune.options import add_option_flags, given_options, options_of
from layerprune.scoring import METRICS, ScoreConfig, ScoreReport, rescorer, score
from layerprune.scoring.base import metric_options
from layerprune.scoring.report import needs_data
from layerprune.scoring.streaming import STREAMING_BATCH_SIZE
from layerprune.selection import DEFAULT_SELECT, STRATEGIES, SelectConfig, Selection, check_remove, parse_remove, select

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|mps|auto|cuda(:\d+)?)$")


def add_command(subparsers: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose ``summary`` (one sentence) is its line in ``layerprune --help`` and opens its own help."""
    if not summary.endswith(".") or summary.count(". ") or not summary[0].isupper():
        raise ValueError(f"the summary of {name!r} must be one sentence, got {summary!r}")
    return subparsers.add_parser(name, help=summary[0].lower() + summary[1:-1], description=summary)


def dtype_name(text: str) -> str:
    """``--dtype``: one of :data:`DTYPES` (fp32/bf16/fp16 are read as their long names)."""
    if text == "auto":
        return text
    try:
        return str(resolve_dtype(text, torch.device("cpu"))).removeprefix("torch.")
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def device_name(text: str) -> str:
    """``--device``: spelled right now; whether that GPU exists is checked when the model loads."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N (N = GPU number), mps or auto")
    return text


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True,
                       help="alias (smollm2-135m, gemma3-270m), checkpoint folder, .gguf file or hub id")
    group.add_argument("--gguf-file", help="GGUF file name inside the --model folder")
    group.add_argument("--dtype", default="auto", type=dtype_name, choices=DTYPES,
                       help="weight dtype; auto is float32 on CPU and bfloat16 on GPUs that support it")
    group.add_argument("--device", default="cpu", type=device_name, help="cpu | cuda | cuda:N | mps | auto")
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


# flags whose values name inputs, comma-separated where a flag takes several
INPUT_FLAGS = ("model", "original", "reference", "data", "source", "prompts", "compare", "ppl", "fidelity",
               "generation_prompts", "classify", "recipe")
LIST_INPUT_FLAGS = ("compare", "ppl", "fidelity")


def input_paths(args: argparse.Namespace) -> list[Path]:
    """Every local file or folder the command's flags name as an input, known without loading anything.

    Outputs must never equal, contain or lie inside one of them (:func:`layerprune.outputs.check_not_an_input`);
    checking this before the load (and not only at save time) makes an output pointing into an input
    fail in the first second. A model is guarded as its folder (a ``.gguf`` file's folder holds the
    tokenizer beside it); an alias as the folder its checkpoint is built in.
    """
    found: list[Path] = []
    for flag in INPUT_FLAGS:
        value = getattr(args, flag, None)
        if not value:
            continue
        for name in (part.strip() for part in str(value).split(",")) if flag in LIST_INPUT_FLAGS else [str(value)]:
            if name in MODEL_ALIASES and flag in ("model", "original", "reference", "compare"):
                found.append(alias_checkpoint_dir(MODEL_ALIASES[name]))
                continue
            path = Path(name).expanduser()
            if path.is_file() and flag in ("model", "original", "compare"):
                found.append(path.parent)
            elif path.exists():
                found.append(path)
    return found


def add_output_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--out FOLDER`` and how the checkpoint there is written (``--overwrite``, ``--format``: the
    options of :class:`ExportConfig`), for the commands that write a checkpoint folder (see the module
    docstring for ``--output FILE``)."""
    parser.add_argument("--out", required=required, metavar="FOLDER",
                        help="output folder (must not exist unless --overwrite)")
    add_option_flags(parser, ExportConfig, skip=("out",))  # --out above: required, which a declaration is not


def export_from_args(args: argparse.Namespace) -> ExportConfig:
    """The output flags as the one typed export config every front-end builds (validated as it is built); a
    GGUF export of a model spread by ``--device-map`` is refused here, before the model is loaded."""
    export = ExportConfig(**given_options(args, ExportConfig))
    if export.format == "gguf" and getattr(args, "device_map", None):
        raise OptionError.about("device_map", DEVICE_MAP_REFUSAL)
    return export


def add_output_file_options(parser: argparse.ArgumentParser, *, required: bool, what: str, overwrite: str) -> None:
    """``--output FILE``, for commands whose result is one file with companions beside it."""
    parser.add_argument("--output", required=required, metavar="FILE", help=what)
    parser.add_argument("--overwrite", action="store_true", help=overwrite)


def safetensors_folder(args: argparse.Namespace, flag: str) -> Path:
    """The local safetensors checkpoint ``--model`` names, for ``flag`` (``--low-memory``,
    ``--streaming``), which read the weight files directly instead of loading the model."""
    folder = resolve_alias(args.model) if args.model in MODEL_ALIASES else Path(args.model).expanduser()
    if not is_safetensors_checkpoint(folder):
        raise UsageError(f"{flag} needs a local safetensors checkpoint folder and {args.model!r} is not one; "
                         f"download it first or drop {flag}")
    return folder


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration data (for metrics that run the model)")
    add_option_flags(group, CalibrationConfig)
    # --batch-size only where given: unless given, --streaming takes STREAMING_BATCH_SIZE (see scoring_from_args)
    add_option_flags(group, ScoreConfig, only_given=True, skip=("metrics", "granularity"))
    add_option_flags(parser.add_argument_group("metric options (each read by the metrics that declare it)"),
                     *metric_options_classes(), skip=("seed",))  # --seed above also seeds the data


def metric_options_classes() -> list[type]:
    """The options classes the registered metrics declare, each once."""
    return list(dict.fromkeys(c for c in (METRICS.get(n).options_class for n in METRICS) if c is not None))


def metric_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The value of every metric option on the command line (flags, and --seed for ``random``)."""
    return {o.name: getattr(args, o.name) for c in metric_options_classes() for o in options_of(c)}


ITERATIVE = "iterative"
"""The strategy ``--iterative`` stands for."""


def add_selection_options(parser: argparse.ArgumentParser, *, select_by: bool) -> None:
    """:class:`SelectConfig`'s flags (``--select-by`` where the command scores several metrics to
    choose from) and ``--iterative``, an alias of ``--strategy iterative``."""
    group = parser.add_argument_group("selection")
    # explicit layers and branches are prune's own --layers/--attention/--mlp (and a recipe's select.layers...),
    # never beside a scored choice
    named = ("layers", "attention", "mlp")
    add_option_flags(group, SelectConfig, skip=named if select_by else ("metric", *named))
    group.add_argument("--iterative", action="store_true", help=f"same as --strategy {ITERATIVE}")


def check_calibration_args(args: argparse.Namespace) -> None:
    """Refuse impossible sizes before any model or data is loaded."""
    calibration = calibration_from_args(args)
    metric_options([], metric_options_from_args(args))
    check_source(calibration.source, calibration.split)  # reads no data: a mistyped --data fails before the model loads


def calibration_from_args(args: argparse.Namespace) -> CalibrationConfig:
    """The calibration flags as the one typed config every front-end builds (validated as it is built)."""
    return CalibrationConfig(**given_options(args, CalibrationConfig))


def scoring_from_args(args: argparse.Namespace, metrics: list[str] | None = None) -> ScoreConfig:
    """The scoring flags as the typed config: ``--metrics`` (or ``metrics``, e.g. prune's ``--metric``)
    and ``--batch-size``, which ``--streaming`` sets to :data:`STREAMING_BATCH_SIZE` unless given."""
    given = given_options(args, ScoreConfig)
    if metrics is not None:
        given["metrics"] = tuple(metrics)
    if getattr(args, "streaming", False):
        given.setdefault("batch_size", STREAMING_BATCH_SIZE)
    return ScoreConfig(**given)


def selection_from_args(args: argparse.Namespace) -> SelectConfig:
    """The selection flags as the typed config, ``--iterative`` read as its strategy (prune's
    ``--metric``, the one metric it scores, is also the one it selects by)."""
    return SelectConfig(**{**given_options(args, SelectConfig), "strategy": selection_strategy(args)})


def selection_strategy(args: argparse.Namespace) -> str:
    """``--strategy``, or with ``--iterative`` the re-scoring strategy: the given one if it re-scores,
    else :data:`ITERATIVE`; a strategy that only reads the scores contradicts ``--iterative``."""
    if not args.iterative:
        return args.strategy
    if args.strategy != DEFAULT_SELECT.strategy and not STRATEGIES.get(args.strategy).rescores:
        raise UsageError(f"--iterative contradicts --strategy {args.strategy}; give one of them")
    return args.strategy if STRATEGIES.get(args.strategy).rescores else ITERATIVE


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
    return build_calibration(loaded.tokenizer, **calibration_from_args(args).model_dump(),
                             max_positions=getattr(loaded.model.config, "max_position_embeddings", None))


def score_and_select(loaded: LoadedModel, args: argparse.Namespace, scoring: ScoreConfig, selection: SelectConfig,
                     calibration: Any = None) -> tuple[ScoreReport, Selection | None]:
    """Score ``loaded`` as ``scoring`` and the calibration flags say (on ``calibration``, or on rows
    built from the flags only if a metric needs data) and, when ``selection`` says how many layers
    go, choose them; iterative selection re-scores the same way."""
    if calibration is None and needs_data(scoring.metrics):
        calibration = build_calibration_from_args(loaded, args)
    report = score_from_args(loaded, args, scoring, calibration)
    if selection.remove is None:
        return report, None
    rescore = rescorer(loaded, calibration, batch_size=scoring.batch_size, granularity=scoring.granularity,
                       **metric_options_from_args(args))
    return report, select(report, **dict(selection), rescore=rescore)


def score_from_args(loaded: LoadedModel, args: argparse.Namespace, scoring: ScoreConfig,
                    calibration: Any = None) -> ScoreReport:
    """Score ``loaded`` as ``scoring`` and the calibration flags say, on ``calibration`` or on rows
    built from the flags when a metric needs data."""
    if calibration is None and needs_data(scoring.metrics):
        calibration = build_calibration_from_args(loaded, args)
    return score(loaded, calibration, **dict(scoring), **metric_options_from_args(args),
                 data=calibration_from_args(args).record() if calibration is not None else None)


def warn_if_most_layers_go(args: argparse.Namespace, removed: int, num_layers: int) -> None:
    """Say so when ``--remove`` takes more than half of the layers: ``--remove 25`` on a 30-layer
    model is easily typed meaning 25%, and a model without most of its layers says nothing about it."""
    if removed * 2 <= num_layers:
        return
    hint = "" if str(args.remove).strip().endswith("%") else f"; for a share, write it with %, e.g. --remove {args.remove}%"
    sys.stderr.write(f"layerprune {args.command}: warning: --remove {args.remove} removes {removed} of {num_layers} "
                     f"layers ({removed / num_layers:.0%}){hint}\n")
