"""``layerprune run``: replay a whole pipeline from a YAML recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerprune.cli.options import add_command
from layerprune.recipes import run_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "run", "Run a YAML recipe: score, select, prune, heal and evaluate.")
    parser.add_argument("recipe", help="the recipe file (see recipes/)")
    parser.add_argument("--model", help="run the recipe on this model instead of the one it names (a recipe "
                                        "names its model, so here --model is optional)")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="run folder (recipe, scores, model/, evaluation)")
    parser.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                        help="let the recipe read files under DIR (besides its own folder and the working directory)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the recipe's load: {trust_remote_code: true} run the model's own Python code "
                             "(refused without this flag)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="let the recipe's load: {allow_pickle: true} load pickle weights, which can run code "
                             "(refused without this flag)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    mode.add_argument("--overwrite", action="store_true", help="delete --out and start again")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = run_recipe(args.recipe, args.out, model=args.model, resume=args.resume, overwrite=args.overwrite,
                         allowed_paths=[Path(p) for p in args.allow_path], trust_remote_code=args.trust_remote_code,
                         allow_pickle=args.allow_pickle)
    print(f"run finished: {folder}")
    return 0
