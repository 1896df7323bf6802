"""Writing results without ever losing the user's work.

Every output folder is built under a hidden temporary name next to its destination and renamed
into place at the end, so a crash or ``kill -9`` leaves either the old state or the complete new
one. An existing destination is refused unless the caller asked to overwrite it, and a
destination that is (or lies inside) a protected folder, such as the source model, is refused
always.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from layerprune.errors import UsageError


def check_output_path(out: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = ()) -> Path:
    """Validate an output folder before any work starts; returns it resolved."""
    target = Path(out).expanduser().resolve()
    for guarded in protected:
        guarded_path = Path(guarded).expanduser().resolve()
        if target == guarded_path or guarded_path in target.parents:
            raise UsageError(
                f"output folder {target} is or lies inside the input {guarded_path}; "
                "choose an output folder outside the input model"
            )
    if target.exists() and not overwrite:
        raise UsageError(f"output {target} already exists; choose a new path or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise UsageError(f"output {target} exists and is not a folder; choose another path")
    return target


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse before writing if the disk that will hold ``folder`` lacks ``needed_bytes``."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise UsageError(
            f"not enough disk space for {folder}: need about {needed_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free; free some space or choose another output folder"
        )


@contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error."""
    target = check_output_path(out, overwrite=overwrite, protected=protected)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_into_place(staging, target)


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any, *, overwrite: bool = True) -> Path:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; choose a new path or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    staging.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(staging, target)
    return target
