"""``layerprune prune``: remove layers and export a standard checkpoint.

The layers are named (``--layers 25-27``) or chosen by a metric in the same command
(``--metric bi --remove 25%``, with the calibration and selection flags of ``layerprune score``),
and the cut can be repaired without training (``--compensate replace-linear|rescale|merge``).
Named layers of a local safetensors checkpoint are cut on the files (shard surgery: the same
tensors bit for bit, in megabytes of memory whatever the model's size); the model is loaded only
when a flag needs it in memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from layerprune.api import prune, save
from layerprune.cli.options import (
    add_calibration_options, add_command, add_model_options, add_output_options, add_selection_options,
    build_calibration_from_args, calibration_from_args, check_calibration_args, export_from_args, input_paths,
    load_from_args, remove_check, safetensors_folder, score_and_select, score_from_args, scoring_from_args,
    selection_from_args, warn_if_most_layers_go,
)
from layerprune.errors import OptionError, UsageError
from layerprune.models.aliases import MODEL_ALIASES, alias_checkpoint_dir, fetch_alias_gguf
from layerprune.models.gguf_file import GGUF_FILE, prune_gguf
from layerprune.models.architectures import ADAPTERS
from layerprune.models.lineage import PROVENANCE_FILE
from layerprune.models.loading import LoadedModel, check_gguf_name
from layerprune.models.shards import is_safetensors_checkpoint, prune_checkpoint
from layerprune.models.decilm import check_decilm
from layerprune.models.sublayers import (
    ATTENTION, KINDS, MLP, kv_bytes_per_layer, plan_branch_removal, present_branches,
)
from layerprune.models.surgery import check_index_list, parse_layer_list, validate_layer_indices
from layerprune.options import add_option_flags, given_options
from layerprune.outputs import check_output_path
from layerprune.repair import REPAIRS, RepairConfig, check_branch_repair, check_repair, compensate
from layerprune.repair.iterative import compensate_iteratively
from layerprune.scoring import ScoreConfig
from layerprune.scoring.report import needs_data
from layerprune.selection import DEFAULT_SELECT, STRATEGIES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "prune", "Remove decoder layers and save a standard checkpoint.")
    add_model_options(parser)
    parser.add_argument("--layers", help="layer indices to remove, e.g. 25,26,27 or 20-27")
    parser.add_argument("--attention", metavar="LIST", help="layers whose attention to remove (their MLP stays), "
                                                            "same syntax as --layers")
    parser.add_argument("--mlp", metavar="LIST", help="layers whose MLP to remove (their attention stays), same "
                                                      "syntax as --layers")
    parser.add_argument("--metric", help="instead of --layers: score with this metric (e.g. bi) and remove the "
                                         "--remove least important layers")
    add_output_options(parser)
    add_selection_options(parser, select_by=False)  # it selects by its one --metric
    add_option_flags(parser, ScoreConfig, only_given=True, skip=("metrics", "batch_size"))  # --granularity
    add_calibration_options(parser)
    parser.add_argument("--generate", metavar="PROMPT", help="after pruning, greedily continue PROMPT and print it")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="length of the --generate continuation")
    parser.add_argument("--compensate", choices=REPAIRS.names(),
                        help="repair the cut without training, on the calibration data: replace-linear (ReplaceMe), "
                             "rescale (Prune&Comp; with --iterative every step re-scores the repaired model) or "
                             "merge (LaCo)")
    add_option_flags(parser.add_argument_group("--compensate options"),
                     *(repair.options_class for _, repair in REPAIRS.registered()), only_given=True)
    parser.add_argument("--low-memory", action="store_true",
                        help="with --layers: refuse instead of loading the model when shard surgery cannot be used. "
                             "Shard surgery (the safetensors files rewritten in a few MB of memory, in their own "
                             "dtype) is the default for a local safetensors checkpoint anyway, unless --generate, "
                             "--dtype, --gguf-file, --device, --device-map or --trust-remote-code needs the model")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.metric:
        if args.attention or args.mlp:
            raise UsageError("give either --attention/--mlp or --metric, not both")
        return run_scored(args)
    if not (args.layers or args.attention or args.mlp):
        raise UsageError("say which layers to remove with --layers (e.g. --layers 25,26,27), which branches with "
                         "--attention/--mlp, or let a metric choose them with --metric bi --remove 25%")
    if args.remove or args.iterative or args.strategy != DEFAULT_SELECT.strategy:
        raise UsageError("--remove/--strategy/--iterative need --metric to choose the layers (e.g. --metric bi "
                         "--remove 25%); with --layers you name them yourself")
    layers = parse_layer_list(args.layers or "")
    branches = {kind: parse_layer_list(getattr(args, kind) or "") for kind in KINDS}
    if any(branches.values()):
        return run_sublayers(args, layers, branches)
    validate_layer_indices(layers)  # empty, negative, repeated: no model needed to tell
    check_generate(args)
    repair = repair_from_args(args)
    export = export_from_args(args)
    check_output_path(args.out, overwrite=args.overwrite, protected=input_paths(args))
    source = gguf_source(args) if export.format == "gguf" else None
    if source is not None and not (needs_model_in_memory(args, ignore_gguf=True) or export.gguf_type):
        return run_gguf_on_disk(args, layers, source)
    if args.low_memory or can_prune_on_disk(args):
        return run_on_disk(args, layers)
    loaded = load_from_args(
        args, check_config=lambda config: validate_layer_indices(layers, getattr(config, "num_hidden_layers", None))
    )
    removed = cut(loaded, layers, args, repair)
    finish(loaded, args, removed)
    return 0


def run_sublayers(args: argparse.Namespace, layers: list[int], branches: dict[str, list[int]]) -> int:
    """``--attention``/``--mlp`` (with whole ``--layers`` beside them): the cut is checked as far as the
    command line tells before the model loads, as far as its config tells before its weights do."""
    if args.low_memory:
        raise UsageError("--low-memory copies whole layers' tensors; removing an attention or MLP needs the model "
                         "in memory: drop --low-memory")
    check_generate(args)
    repair = repair_from_args(args)
    if repair is not None:
        repair.repairer.check_branch_cuts()
    export = export_from_args(args)
    for what, named in (("layer", layers), (ATTENTION, branches[ATTENTION]), ("MLP", branches[MLP])):
        check_index_list(named, None, what)  # negative, repeated: no model needed to tell
    check_output_path(args.out, overwrite=args.overwrite, protected=input_paths(args))

    def check(config: Any) -> None:  # the rest once the config is read, before the weights load
        count = getattr(config, "num_hidden_layers", None)
        if count is not None:
            plan_branch_removal([(True, True)] * count, layers, branches[ATTENTION], branches[MLP])
        if export.format != "transformers":  # decilm, or gguf as llama.cpp's deci
            check_decilm(config, ffn_mult=export.format == "decilm")

    loaded = load_from_args(args, check_config=check)
    removed = cut_branches(loaded, layers, branches[ATTENTION], branches[MLP], args, repair)
    finish(loaded, args, removed)
    return 0


def cut_branches(loaded: LoadedModel, layers: list[int], attention: list[int], mlp: list[int],
                 args: argparse.Namespace, repair: RepairConfig | None, reason: str = "layers named by the user",
                 calibration: Any = None) -> list[int]:
    """Remove whole ``layers`` and the named branches; with ``repair`` (``--compensate``), repair the cut
    (checked before any data is read); returns the layers that went whole."""
    if repair is None:
        return prune(loaded, layers, reason, attention=attention, mlp=mlp)
    check_branch_repair(loaded, layers, attention, mlp, repair.repairer.name, repair.options)
    rows = calibration if calibration is not None else calibration_rows(loaded, args)
    whole = plan_branch_removal(present_branches(loaded.model, loaded.adapter), layers, attention, mlp)
    report = compensate(loaded, layers, data=rows, reason=reason, attention=attention, mlp=mlp, **dict(repair))
    record_compensation(loaded, args, report.summary, report.seconds)
    return whole


def needs_model_in_memory(args: argparse.Namespace, ignore_gguf: bool = False) -> bool:
    """Whether a flag asks for something only the loaded model can give: a continuation, a repair,
    another dtype, a GGUF file, a placement, or the repository's own code (which may not match our
    adapters). ``ignore_gguf``: for a cut from a GGUF file to a GGUF file, which neither reads the
    model into memory nor changes its dtype."""
    if not ignore_gguf and (args.gguf_file or args.dtype != "auto"):
        return True
    return bool(args.generate or args.compensate or args.device != "cpu" or args.device_map or args.trust_remote_code)


def gguf_source(args: argparse.Namespace) -> Path | None:
    """The GGUF file the model flags name: a ``.gguf`` path, a folder with ``--gguf-file``, or an alias
    that ships as one; None for any other model."""
    alias = MODEL_ALIASES.get(args.model)
    if alias is not None:
        return fetch_alias_gguf(alias)
    path = Path(args.model).expanduser()
    if args.gguf_file:
        return path / check_gguf_name(args.gguf_file)
    return path if path.suffix == ".gguf" else None


def run_gguf_on_disk(args: argparse.Namespace, layers: list[int], source: Path) -> int:
    """Cut a GGUF file into a GGUF file (:func:`layerprune.models.gguf_file.prune_gguf`): the kept tensors
    are copied byte for byte, and no model is loaded."""
    out = prune_gguf(source, layers, args.out, overwrite=args.overwrite, source_name=args.model)
    record = json.loads((out / PROVENANCE_FILE).read_text())
    print(f"removed layers {sorted(layers)}: {record['original_num_layers']} -> {record['num_layers']} layers; "
          f"saved to {out / GGUF_FILE}")
    return 0


def can_prune_on_disk(args: argparse.Namespace) -> bool:
    """Whether shard surgery applies: a local safetensors checkpoint of a registered family and no flag
    that needs the model in memory. Anything else (a hub id, pickle weights, a broken or unknown
    checkpoint) goes through the loader, whose checks and messages cover every format."""
    if needs_model_in_memory(args) or args.format != "transformers":
        return False
    alias = MODEL_ALIASES.get(args.model)  # an alias not yet built is built by loading it, once
    folder = alias_checkpoint_dir(alias) if alias else Path(args.model).expanduser()
    if not is_safetensors_checkpoint(folder):
        return False
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in ADAPTERS


def run_on_disk(args: argparse.Namespace, layers: list[int]) -> int:
    """Shard surgery on the files (:mod:`layerprune.models.shards`); no model is loaded."""
    if args.format == "decilm":
        raise UsageError("--low-memory copies the safetensors files as they are; --format decilm rewrites the "
                         "config and weights in memory: drop --low-memory")
    if args.format == "gguf":
        raise UsageError("--low-memory with --format gguf cuts a GGUF file (a .gguf model, --gguf-file or an alias "
                         "that ships as one); a safetensors checkpoint is converted in memory: drop --low-memory")
    if needs_model_in_memory(args):
        raise UsageError("--low-memory copies the safetensors files as they are, so it cannot --generate, "
                         "--compensate, read GGUF, change --dtype or place the model (--device, --device-map, "
                         "--trust-remote-code); leave those out or drop --low-memory")
    folder = safetensors_folder(args, "--low-memory")
    out = prune_checkpoint(folder, layers, args.out, overwrite=args.overwrite, source_name=args.model)
    record = json.loads((out / PROVENANCE_FILE).read_text())
    print(f"removed layers {sorted(layers)}: {record['original_num_layers']} -> {record['num_layers']} layers; "
          f"saved to {out}")
    return 0


def run_scored(args: argparse.Namespace) -> int:
    """Score, select and prune in one command; the selection and its data go into layerprune.json."""
    if args.low_memory:
        raise UsageError("--low-memory prunes named layers (--layers); to let a metric choose them on a model that "
                         "does not fit in memory, run layerprune score with streaming first")
    if args.layers:
        raise UsageError("give either --layers or --metric, not both")
    if not args.remove:
        raise UsageError(f"--metric {args.metric} needs --remove to say how many layers go (e.g. --remove 25%)")
    scoring = scoring_from_args(args, [args.metric])
    metric = scoring.metrics[0]
    check_calibration_args(args)
    selecting = selection_from_args(args)
    check_layers = remove_check(selecting.remove)
    check_generate(args)
    repair = repair_from_args(args)
    if scoring.granularity == "sublayer" and repair is not None:
        repair.repairer.check_branch_cuts()
        if STRATEGIES.get(selecting.strategy).rescores:
            raise UsageError(f"--strategy {selecting.strategy} with --compensate re-scores whole layers after each "
                             "repaired step; at --granularity sublayer choose another --strategy")
    check_output_path(args.out, overwrite=args.overwrite, protected=input_paths(args))
    loaded = load_from_args(args, check_config=check_layers)
    reason = f"{metric} scores, {selecting.strategy} selection"
    # one set of calibration rows for scoring and for the repair's statistics
    repair_rows = repair is not None and repair.repairer.needs_statistics
    calibration = build_calibration_from_args(loaded, args) if needs_data(scoring.metrics) or repair_rows else None
    if repair is not None and STRATEGIES.get(selecting.strategy).rescores:  # Prune&Comp: each step re-scores the repaired model
        report = score_from_args(loaded, args, scoring, calibration)
        began = time.perf_counter()
        rescoring = ScoreConfig(metrics=(metric,), batch_size=scoring.batch_size)
        selection = compensate_iteratively(
            loaded, report, selecting.remove, repair.repairer.name, calibration if repair_rows else None,
            rescore=lambda name: score_from_args(loaded, args, rescoring, calibration).results[name],
            metric=metric, options=repair.options, batch_size=repair.batch_size,
            reason=f"{reason}, {args.compensate} after every step")
        record_compensation(loaded, args, loaded.lineage["repairs"][-1]["summary"], time.perf_counter() - began)
        removed = selection.remove
    else:
        report, chosen = score_and_select(loaded, args, scoring, selecting, calibration)
        assert chosen is not None, "run_scored refuses a missing --remove before scoring"
        selection = chosen
        if selection.units:  # branches: the cut of --attention/--mlp
            removed = cut_branches(loaded, [], selection.branches(ATTENTION), selection.branches(MLP), args, repair,
                                   reason=reason, calibration=calibration if repair_rows else None)
        else:
            removed = cut(loaded, selection.remove, args, repair, reason=reason,
                          calibration=calibration if repair_rows else None)
            warn_if_most_layers_go(args, len(selection.remove), report.num_layers)
    recipe = {"selection": selection.to_json(), "importance": report.results[metric].importance,
              "data": report.data, "tokens": report.tokens}
    finish(loaded, args, removed, recipe)
    return 0


def repair_from_args(args: argparse.Namespace) -> RepairConfig | None:
    """``--compensate``, ``--batch-size`` and the method's own flags as the typed config (none
    without ``--compensate``), checked before any model is loaded; a flag of another method (or
    without --compensate) is refused."""
    given = {name: value for _, repair in REPAIRS.registered() for name, value in given_options(args, repair.options_class).items()}
    if not args.compensate:
        if given:
            raise UsageError(f"--{next(iter(given)).replace('_', '-')} is an option of --compensate; add --compensate "
                             "METHOD or drop it")
        return None
    check_calibration_args(args)
    return RepairConfig.from_flat({**given_options(args, RepairConfig), "method": args.compensate, **given})


def calibration_rows(loaded: LoadedModel, args: argparse.Namespace) -> Any:
    """The calibration windows of the data flags, or ``None`` for a method that reads weights only."""
    return build_calibration_from_args(loaded, args) if REPAIRS.get(args.compensate).needs_statistics else None


def cut(loaded: LoadedModel, layers: list[int], args: argparse.Namespace, repair: RepairConfig | None,
        reason: str = "layers named by the user", calibration: Any = None) -> list[int]:
    """Remove ``layers``; with ``repair`` (``--compensate``), repair the cut (statistics from ``loaded``
    before it, on ``calibration`` when the caller already built the rows)."""
    if repair is None:
        return prune(loaded, layers, reason)
    check_repair(loaded, layers, repair.repairer.name, repair.options)  # refuse before reading any data
    rows = calibration if calibration is not None else calibration_rows(loaded, args)
    report = compensate(loaded, layers, data=rows, reason=reason, **dict(repair))
    record_compensation(loaded, args, report.summary, report.seconds)
    return sorted(layers)


def record_compensation(loaded: LoadedModel, args: argparse.Namespace, summary: str, seconds: float) -> None:
    """A healing entry, so the model card says how the cut was repaired (details: ``repairs``)."""
    loaded.lineage["healing"].append({"method": args.compensate, "summary": f"training-free: {summary}",
                                      "data": calibration_from_args(args).record(), "trainable_parameters": 0,
                                      "train_seconds": round(seconds, 1)})


def check_generate(args: argparse.Namespace) -> None:
    if args.generate and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def finish(loaded: LoadedModel, args: argparse.Namespace, removed: list[int], recipe: dict[str, Any] | None = None) -> None:
    if args.generate:  # refused before anything is written: the demo must fit the model's context
        check_fits_context(loaded, len(loaded.tokenizer(args.generate)["input_ids"]), args.max_new_tokens)
    folder = save(loaded, recipe=recipe, **export_from_args(args).model_dump())
    repaired = next((f"; repaired with {step['method']} ({step['summary']})" for step in loaded.lineage["healing"]
                     if args.compensate and step["method"] == args.compensate), "")
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    if record.get("branches"):
        per_layer = kv_bytes_per_layer(loaded.model.config, loaded.model.dtype)
        print(f"{export_summary(record, per_layer)}{repaired}; saved to {folder}")
    else:
        print(f"removed layers {removed}: {record['original_num_layers']} -> {record['num_layers']} layers{repaired}; "
              f"saved to {folder}")
    if args.generate:
        print(generate_text(loaded, args.generate, args.max_new_tokens))


def export_summary(record: dict[str, Any], kv_per_layer: int) -> str:
    """What a sub-layer cut became in the written checkpoint: its removed branches, layers and zero partners,
    where the standard layout saves no layer the format that does, and the KV cache per token
    (``kv_per_layer`` bytes per attention layer) of the original, of the cut as layerprune and the DeciLM
    runtimes run it, and of the transformers form, whose zero-partner attentions still cache keys."""
    line = (f"removed layers {record['removed_layers']}, the attention of layers {record['removed_attention']} and "
            f"the MLP of layers {record['removed_mlp']} (original numbering): {record['original_num_layers']} -> "
            f"{record['num_layers']} layers, {record['zero_partners']} zero partner(s)")
    if record.get("format") != "decilm" and record["num_layers"] + len(record["removed_layers"]) >= record[
            "original_num_layers"]:
        line += (" (a standard layer holds an attention and an MLP, so this cut saves no layers in the transformers "
                 "form; --format decilm drops the removed branches)")
    attentions = sum(branch["attention"] is not None for branch in record["branches"])
    line += (f"; KV cache per token {record['original_num_layers'] * kv_per_layer} -> {attentions * kv_per_layer} "
             "bytes")
    if record.get("format") != "decilm" and attentions < record["num_layers"]:
        line += f" ({record['num_layers'] * kv_per_layer} in plain transformers, which caches its zero partners')"
    return line


def check_fits_context(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt plus its continuation within the model's context: a model with learned positions (GPT-2,
    OPT) indexes past its position table otherwise."""
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise OptionError.about("max_new_tokens", f"{max_new_tokens} after a {prompt_tokens}-token prompt passes the "
                                                  f"model's context of {context} tokens; use at most "
                                                  f"{max(context - prompt_tokens, 0)} (or a shorter prompt)")


def generate_text(loaded: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt``: a quick sanity check that the pruned model still speaks."""
    inputs = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.model.device)
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(output[0], skip_special_tokens=True)
