"""Writing files and folders without ever leaving half of one: the one module that writes atomically.

Every output folder, output file, checkpoint and cache entry is built under a hidden temporary name
(``.NAME.partial-PID``) next to its destination and renamed into place at the end, so a crash or
``kill -9`` leaves either the old state or the complete new one. An existing destination is
refused unless the caller asked to overwrite it, and a destination that is (or lies inside) a
protected folder, such as the source model, is refused always. What a killed run leaves behind
(hidden ``.NAME.partial-PID`` / ``.NAME.old-PID`` files and folders of a process that no longer
exists) is cleared, or put back, by the next run that writes there.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from layerprune.errors import UsageError


def check_output_path(out: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = ()) -> Path:
    """Validate an output folder before any work starts; returns it resolved."""
    target = Path(out).expanduser().resolve()
    recover_interrupted(target)
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


def _owner_is_gone(leftover: Path) -> bool:
    """Whether the process whose id ends ``leftover``'s name no longer runs."""
    pid = leftover.name.rpartition("-")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def recover_interrupted(target: Path) -> None:
    """Undo what a killed run left beside ``target``, so it can never be mistaken for output.

    A half-built staging folder is deleted. A retired folder (an overwrite killed between its two
    renames, possible only where the atomic exchange is unsupported) is put back if ``target``
    is missing, so the user sees the old state again; otherwise deleted.
    """
    if not target.parent.is_dir():
        return
    prefix = f".{glob.escape(target.name)}"
    for retired in sorted(target.parent.glob(f"{prefix}.old-*")):
        if _owner_is_gone(retired):
            if target.exists():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(retired, target)
    for staging in target.parent.glob(f"{prefix}.partial-*"):
        if _owner_is_gone(staging):
            _remove(staging)


def clear_leftovers(folder: Path) -> None:
    """Delete every staging file or folder in ``folder`` whose writer was killed.

    For folders that only layerprune writes into (the cache), where a leftover of any entry is
    ours to clear; beside a user's output, :func:`recover_interrupted` touches only that output's.
    """
    if folder.is_dir():
        for staging in folder.glob(".*.partial-*"):
            if _owner_is_gone(staging):
                _remove(staging)


def _remove(path: Path) -> None:
    """Delete a leftover, whether a killed run left a file or a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _staging_path(target: Path) -> Path:
    """The hidden name this process builds ``target`` under (``.NAME.partial-PID``, beside it), which
    :func:`recover_interrupted` and :func:`clear_leftovers` recognise if the process dies."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


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
    with _staging_dir(target) as staging:
        yield staging
        apply_umask(staging)
        _swap_into_place(staging, target)


@contextmanager
def atomic_cache_dir(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes the cache entry ``folder`` if the block succeeds.

    A cache entry is a function of its key, so where another process finished the same entry
    first, that one is kept and this one dropped. Leftovers of killed writers in the cache folder
    are cleared first, whatever entry they were building.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(folder.parent)
    with _staging_dir(folder) as staging:
        yield staging
        if not folder.exists():
            os.replace(staging, folder)


@contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A fresh staging folder for ``target``; deleted afterwards unless the block moved it into place."""
    staging = _staging_path(target)
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def scratch_dir(parent: Path, purpose: str) -> Iterator[Path]:
    """A private working folder in ``parent`` (same disk, so results rename out of it), always
    deleted afterwards; a killed run's is cleared by the next :func:`clear_leftovers` of ``parent``."""
    parent.mkdir(parents=True, exist_ok=True)
    with _staging_dir(parent / purpose) as scratch:
        yield scratch


def apply_umask(folder: Path) -> None:
    """Give everything under ``folder`` the mode a plainly created file or folder gets under the umask.

    Some writers create files through a private temporary file (safetensors' ``save_file`` leaves
    ``model.safetensors`` at 0600), so an exported model could not be shared even under umask 022.
    Outputs hold data, never programs, so files get ``0o666 & ~umask`` and folders ``0o777 & ~umask``.
    """
    umask = os.umask(0)  # the only way to read the umask is to set it; put it back at once
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system cannot, so the caller falls back to two renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Make ``staging`` the ``target``; there is no moment at which neither exists."""
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
        return
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any, *, overwrite: bool = True) -> Path:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    return write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode(), overwrite=overwrite)


def write_bytes_atomic(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    """Write any file (text, PNG) through a temporary file and a rename."""
    with atomic_file(path, overwrite=overwrite) as staging:
        staging.write_bytes(data)
    return Path(path).expanduser()


@contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write (``torch.save``, a copy) that becomes ``path`` only if the
    block finishes without error; readers never see half a file."""
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; choose a new path or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    staging = _staging_path(target)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
