"""``layerprune info``: what a model is, before deciding what to cut."""

from __future__ import annotations

import argparse
import json

from layerprune.api import info
from layerprune.cli.options import add_command, add_model_options, load_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "info", "Show a model's family, layer count and parameters.")
    add_model_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    details = info(load_from_args(args))
    if args.json:
        print(json.dumps(details, indent=2))
        return 0
    for key, value in details.items():
        if key == "parameters":
            value = f"{value:,}"
        if value is not None:
            print(f"{key:>15}: {value}")
    return 0
