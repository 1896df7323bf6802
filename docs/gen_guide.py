"""Run every command of docs/guide.md and write what it printed under it.

    python docs/gen_guide.py              # every command, in order (about half an hour on 2 cores)
    python docs/gen_guide.py --workdir W  # keep the outputs (out/...) in W instead of a scratch folder

In the guide, a ```bash block holding one ``layerprune`` command followed by a ```text block is a
command and its output: each command runs in one working folder (so ``out/...`` paths print as
written, and a later command reads what an earlier one wrote), and its standard output replaces the
text block (progress goes to stderr and is left out). The records the slow commands write
(``eval.json``) are kept in ``docs/guide/``, so ``tests/test_guide.py`` can check the printed
tables against the current code without re-running them, and re-runs the quick commands.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
GUIDE = DOCS / "guide.md"
RECORDS = DOCS / "guide"
KEPT_RECORDS = ("out/eval.json",)
BLOCK = re.compile(r"```bash\n(?P<command>layerprune [^\n]+)\n```\n\n```text\n(?P<output>.*?)```", re.S)


def commands(guide: str) -> list[re.Match[str]]:
    """Every command of the guide with its output block, in order."""
    return list(BLOCK.finditer(guide))


def run(command: str, workdir: Path) -> str:
    """What ``command`` (a ``layerprune ...`` line) prints on stdout, run in ``workdir``."""
    argv = [sys.executable, "-m", "layerprune.cli.main", *shlex.split(command)[1:]]
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.replace(f"{workdir.resolve()}/", "")  # paths as the reader's own run prints them


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the commands run (default: a scratch folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="layerprune-guide-"))
    workdir.mkdir(parents=True, exist_ok=True)
    guide = GUIDE.read_text()
    for match in commands(guide):
        print(f"running: {match['command']}", file=sys.stderr)
        output = run(match["command"], workdir)
        guide = guide.replace(match.group(0), match.group(0).replace(match["output"], output, 1), 1)
        GUIDE.write_text(guide)  # after each command: a long run that fails keeps what it did
    RECORDS.mkdir(exist_ok=True)
    for record in KEPT_RECORDS:
        shutil.copyfile(workdir / record, RECORDS / Path(record).name)
    print(f"wrote {GUIDE} and {RECORDS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
