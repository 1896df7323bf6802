"""``layerprune eval``: perplexity, zero-shot tasks, stability, efficiency and the classification
curve of a model and the models it is compared with, as JSON + a Markdown table + plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerprune.errors import UsageError
from layerprune.evaluation.classification import HEAD_KINDS, ClassificationSettings
from layerprune.evaluation.efficiency import Workload
from layerprune.evaluation.evaluate import evaluate
from layerprune.evaluation.harness import OFFLINE_TASKS, ONLINE_TASKS
from layerprune.evaluation.perplexity import PPL_SOURCES
from layerprune.cli.options import add_command, add_model_options, add_output_file_options
from layerprune.reporting.eval_tables import write_report


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be comma-separated integers, e.g. {flag} 1,2,4,8") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "eval", "Evaluate a model, and compare others with it: perplexity, lm-eval "
                                             "tasks, speed, the classification curve.")
    add_model_options(parser)
    parser.add_argument("--compare", help="models to put beside --model (the reference), comma-separated")
    add_output_file_options(parser, required=True, what="results JSON; the .md table and .png plot go beside it",
                            overwrite="replace existing output files")
    group = parser.add_argument_group("perplexity")
    group.add_argument("--ppl", help=f"data sets, comma-separated: {', '.join(PPL_SOURCES)} or text files")
    group.add_argument("--seq-len", type=int, default=512,
                       help="window length in tokens (default: 512, twice the 256 of scoring and healing rows: a "
                            "perplexity is comparable only at the window the reported results used)")
    group.add_argument("--max-windows", type=int, help="score only the first N windows (quick looks)")
    group = parser.add_argument_group("lm-eval")
    group.add_argument("--tasks", help=f"lp_offline (the offline suite) or offline tasks {', '.join(OFFLINE_TASKS)}; "
                       f"online: paper ({','.join(ONLINE_TASKS)}) or any lm-eval task")
    group.add_argument("--limit", type=int, help="documents per task (default: all)")
    group.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's own)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    group = parser.add_argument_group("efficiency")
    group.add_argument("--efficiency", action="store_true", help="measure size, throughput, memory and FLOPs")
    group.add_argument("--prompt-len", type=int, default=128, help="prefill length (default: 128)")
    group.add_argument("--new-tokens", type=int, default=64, help="decode steps (default: 64)")
    group.add_argument("--repeats", type=int, default=5, help="timed repeats, median kept (default: 5)")
    group = parser.add_argument_group("classification curve (fine-tunes the first k layers)")
    group.add_argument("--classify", help="labelled data set, e.g. rotten-tomatoes, reuters-r8 (sst2, ag_news online)")
    group.add_argument("--k", help="layer counts to keep, e.g. 1,2,4,8,16,30")
    group.add_argument("--heads", default=",".join(HEAD_KINDS), help="verbalizer,head (default: both)")
    group.add_argument("--template", help="prompt with {text}, e.g. '{text}\\nSentiment:'")
    group.add_argument("--verbalizer", help="answer words, one per class in label order (default: label names)")
    group.add_argument("--train-size", type=int, default=512, help="training examples (default: 512)")
    group.add_argument("--test-size", type=int, default=400, help="test examples (default: 400)")
    group.add_argument("--epochs", type=int, default=2, help="training epochs per k (default: 2)")
    group.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the layers (default: 1e-4)")
    group.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the new head (default: 1e-3)")
    parser.set_defaults(run=run)


def _classification(args: argparse.Namespace) -> ClassificationSettings | None:
    if not args.classify:
        return None
    if not args.k:
        raise UsageError("--classify needs --k, the layer counts to keep, e.g. --k 1,2,4,8,16,30")
    options = dict(ks=_ints(args.k, "--k"), heads=tuple(_names(args.heads)), verbalizer=tuple(_names(args.verbalizer)),
                   train_size=args.train_size, test_size=args.test_size, epochs=args.epochs, lr=args.lr,
                   head_lr=args.head_lr)
    if args.template:
        options["template"] = args.template.replace("\\n", "\n")
    return ClassificationSettings(**options)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser()
    if output.suffix != ".json":
        raise UsageError(f"--output {args.output} must end in .json (the .md and .png are written beside it)")
    existing = [path for path in (output, output.with_suffix(".md"), output.with_suffix(".png"),
                                  *output.parent.glob(f"{output.stem}-curve-*.png")) if path.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} already exists; choose another --output or pass --overwrite")
    workload = (Workload(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
                if args.efficiency else None)
    report = evaluate(
        args.model, compare=_names(args.compare), ppl=_names(args.ppl), seq_len=args.seq_len,
        max_windows=args.max_windows, tasks=_names(args.tasks), limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, efficiency=workload, classify=args.classify, classification=_classification(args),
        gguf_file=args.gguf_file, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle, device_map=args.device_map,
    )
    written = write_report(report, output)
    print(output.with_suffix(".md").read_text(), end="")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
