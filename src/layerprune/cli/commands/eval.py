"""``layerprune eval``: perplexity, zero-shot tasks, stability, efficiency and the classification
curve of a model and the models it is compared with, as JSON + a Markdown table + plots.

Its evaluation flags are generated from :class:`~layerprune.evaluation.config.EvalConfig` (and the
efficiency and classification options it nests), so they take the API's names, defaults and checks.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
from pathlib import Path

from layerprune.cli.options import add_command, add_model_options, add_output_file_options, input_paths
from layerprune.errors import UsageError
from layerprune.evaluation.classification import ClassificationSettings
from layerprune.evaluation.config import EvalConfig
from layerprune.evaluation.efficiency import Workload, check_workload_fits
from layerprune.evaluation.evaluate import evaluate
from layerprune.evaluation.llamacpp import LlamaCppConfig, evaluate_gguf, llama_module, report_table
from layerprune.models.loading import read_local_config
from layerprune.options import add_option_flags, comma_list, given_options, options_of
from layerprune.outputs import check_output_file, write_bytes_atomic, write_json_atomic
from layerprune.reporting.eval_tables import report_markdown, write_report

RUNTIMES = ("transformers", "llamacpp")

# the EvalConfig options each help group shows; batch_size and classify stand beside them
GROUPS = {"perplexity": ("ppl", "seq_len", "max_windows"), "lm-eval": ("tasks", "limit", "num_fewshot"),
          "against the original (fidelity on perplexity's windows, generation agreement)": (
              "fidelity", "reference", "generation", "generation_tokens", "generation_prompts", "prompt_tokens")}


def check_fits_context(model: str, args: argparse.Namespace, config: EvalConfig, workload: Workload) -> None:
    """``--seq-len`` and the efficiency workload within the context of ``model``, read from its local
    config (a hub id is checked when it loads), before any model loads: windows longer than the position
    table give meaningless perplexities, slowly, and a model with learned positions fails past it."""
    try:
        local = read_local_config(model, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code,
                                  allow_pickle=args.allow_pickle)
    except UsageError:
        return  # the load reports an unreadable model in its own words
    context = getattr(local, "max_position_embeddings", None)
    if context is not None and (config.ppl or config.fidelity) and config.seq_len > context:
        raise UsageError(f"--seq-len {config.seq_len} is longer than the context of {model} ({context} tokens); "
                         f"use --seq-len {context} or less")
    if args.efficiency:
        check_workload_fits(workload, context, model)


def check_lm_eval_installed(tasks: tuple[str, ...]) -> None:
    """``--tasks`` runs lm-eval, an optional extra: say how to install it before any model loads."""
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--tasks needs lm-eval; install it with: pip install 'layerprune[eval]'")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "eval", "Evaluate a model, and compare others with it: perplexity, lm-eval "
                                             "tasks, fidelity to the original, speed, the classification curve.")
    add_model_options(parser)
    parser.add_argument("--compare", help="models to put beside --model (the reference), comma-separated")
    parser.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                        help="where the models run: transformers, or llamacpp (GGUF files in llama.cpp: perplexity, "
                             "and with --efficiency prefill/decode tokens/s timed in turns; needs layerprune[llamacpp])")
    add_output_file_options(parser, required=True, what="results JSON; beside it go NAME.md (the table), NAME.png (the plot) and, with "
                                 "--classify, NAME-curve-N.png: each is an output",
                            overwrite="replace those files, only ones layerprune wrote (recognised by their content)")
    names = {option.name for option in options_of(EvalConfig)}
    grouped = {name for members in GROUPS.values() for name in members}
    for title, members in GROUPS.items():
        add_option_flags(parser.add_argument_group(title), EvalConfig, only_given=True, skip=names - set(members))
    # --efficiency is a switch here (its workload's options are flags of their own), --classify stands below
    add_option_flags(parser, EvalConfig, only_given=True, skip=grouped | {"efficiency", "classify"})
    group = parser.add_argument_group("efficiency")
    group.add_argument("--efficiency", action="store_true", help="measure size, throughput, memory and FLOPs")
    add_option_flags(group, Workload, only_given=True)
    group = parser.add_argument_group("classification curve (fine-tunes the first k layers)")
    add_option_flags(group, EvalConfig, only_given=True, skip=names - {"classify"})
    add_option_flags(group, ClassificationSettings, only_given=True)
    add_option_flags(parser.add_argument_group("llama.cpp runtime (--runtime llamacpp)"), LlamaCppConfig, only_given=True)
    parser.set_defaults(run=run)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The flags as the one typed config the API and recipes build, checked as it is built. The
    nested options are checked even when their switch (``--efficiency``, ``--classify``) is off."""
    workload = Workload(**given_options(args, Workload))
    classification = ClassificationSettings(**given_options(args, ClassificationSettings))
    return EvalConfig(**{**given_options(args, EvalConfig),  # --efficiency: the switch, here its workload
                         "efficiency": workload if args.efficiency else None,
                         "classification": classification if getattr(args, "classify", None) else None})


def compared_models(args: argparse.Namespace) -> tuple[str, ...]:
    """``--compare``'s models (an empty entry refused, as every comma-separated flag's)."""
    try:
        return comma_list(args.compare) if args.compare else ()
    except UsageError as error:
        raise UsageError(f"--compare {error}") from None


def run(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser()
    if output.suffix != ".json":
        raise UsageError(f"--output {args.output} must end in .json (the .md and .png are written beside it)")
    config = eval_config(args)
    compare = compared_models(args)
    if args.runtime == "llamacpp":
        return run_llamacpp(args, output, config, compare)
    if given_options(args, LlamaCppConfig):
        raise UsageError(f"--{next(iter(given_options(args, LlamaCppConfig)))} is an option of --runtime llamacpp; "
                         "add that or drop it")
    for model in [args.model, *compare]:
        check_fits_context(model, args, config, config.efficiency or Workload())
    check_lm_eval_installed(config.tasks)
    inputs = input_paths(args)
    for path in (output, output.with_suffix(".md"), output.with_suffix(".png"),
                 *output.parent.glob(f"{glob.escape(output.stem)}-curve-*.png")):  # a name may hold [ ] * ?
        check_output_file(path, overwrite=args.overwrite, protected=inputs)
    report = evaluate(
        args.model, compare=compare, config=config, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, device_map=args.device_map,
    )
    written = write_report(report, output)
    print(report_markdown(report), end="")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def run_llamacpp(args: argparse.Namespace, output: Path, config: EvalConfig, compare: tuple[str, ...]) -> int:
    """``--runtime llamacpp``: the GGUF files' perplexity and speed in llama.cpp (:mod:`layerprune.evaluation.llamacpp`)."""
    if config.tasks or config.classify:
        raise UsageError("--runtime llamacpp measures perplexity and speed; run --tasks and --classify with the "
                         "transformers runtime")
    settings = LlamaCppConfig(**given_options(args, LlamaCppConfig))
    llama_module()  # how to install it, before any file is read
    for path in (output, output.with_suffix(".md")):
        check_output_file(path, overwrite=args.overwrite, protected=input_paths(args))
    report = evaluate_gguf([args.model, *compare], config, settings)
    table = report_table(report)
    write_json_atomic(output, report)
    write_bytes_atomic(output.with_suffix(".md"), table.encode())
    print(table, end="")
    print(f"wrote {output}, {output.with_suffix('.md')}")
    return 0
