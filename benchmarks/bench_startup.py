"""Start-up: CPU seconds of ``layerprune --help``, ``--version`` and a bad flag, each in a fresh process.

    python benchmarks/bench_startup.py            # writes docs/benchmarks.md § Start-up

docs/errors.md promises that bad input fails in the first second: these answers come from the
quick parser (``layerprune/cli/commands.json``) before torch is imported. Beside them, for scale,
the same process importing the real parser (what a command that runs pays before its work). CPU
time (user + system of the child), not wall-clock, so a loaded machine changes it little; the
median of the repeats, the cases alternated.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch
import transformers

from layerprune.reporting.eval_tables import update_doc_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
CASES = {
    "layerprune --help": ["-m", "layerprune.cli.main", "--help"],
    "layerprune --version": ["-m", "layerprune.cli.main", "--version"],
    "layerprune prune --bogus (bad flag)": ["-m", "layerprune.cli.main", "prune", "--bogus"],
    "layerprune score --samples x (bad value)": ["-m", "layerprune.cli.main", "score", "--model", "m", "--samples", "x"],
    "the real parser, for scale (imports torch and transformers)": [
        "-c", "from layerprune.cli.main import build_parser; build_parser()"],
}
GOAL_SECONDS = 1.0


def cpu_seconds(arguments: list[str]) -> float:
    """User + system CPU seconds of one child process running ``python arguments``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, *arguments], capture_output=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, arguments in CASES.items():
            times[name].append(cpu_seconds(arguments))
    rows = ["| command | CPU seconds (median) | range | under 1 s |", "|---|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(f"| `{name}` | {median:.2f} | {min(values):.2f}-{max(values):.2f} | "
                    f"{'yes' if median < GOAL_SECONDS else 'no'} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_doc:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, transformers {transformers.__version__}")
        body = "\n\n".join([
            f"`python benchmarks/bench_startup.py`: CPU seconds (user + system) of a fresh Python process per command, "
            f"median of {args.repeats} alternated repeats; {machine}; {date.today().isoformat()}, 1-minute load "
            f"average {load:.2f} at the start. Goal: under {GOAL_SECONDS:g} s for help, version and bad input "
            "(answered by the quick parser, before torch is imported).", table])
        update_doc_section(DOC, "## Start-up", "### Help, version and bad flags", body)


if __name__ == "__main__":
    main()
