"""Writing files and folders without ever leaving half of one: the one module that writes atomically.

Every output folder, output file, checkpoint and cache entry is built under a hidden temporary name
(``.NAME.partial-PID``) next to its destination and renamed into place at the end, so a crash or
``kill -9`` leaves either the old state or the complete new one; what was written is flushed to
disk before the rename, and the rename after it (:func:`_publish`), so a power loss does too. An
existing destination is refused unless the caller asked to overwrite it, and a destination that is
(or lies inside) a protected folder, such as the source model, is refused always. What a killed
run leaves behind (hidden ``.NAME.partial-PID`` / ``.NAME.old-PID`` files and folders of a process
that no longer exists) is cleared, or put back, by the next run that writes there.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from layerprune.errors import OptionError, UsageError
from layerprune.records import holds_record, is_record_file


# Files whose presence marks a folder as one layerprune wrote: a saved model's provenance, a run
# folder's state, a search folder's record. ``--overwrite`` replaces such a folder (or an empty one),
# never anything else.
PNG_SOFTWARE = "layerprune"
"""The ``Software`` text every figure layerprune draws carries in its PNG (``savefig(metadata=...)``),
by which an existing PNG is recognised as its own."""
MARKDOWN_MARK = "<!-- written by layerprune -->"
"""The first line of every Markdown report layerprune writes beside its JSON, likewise."""
NOT_OURS = "not a layerprune output; remove it yourself or choose another path"

# errno -> why a write failed, in words a user can act on (see :func:`write_failure`)
WRITE_FAILURES = {
    errno.EROFS: "the file system is read-only; choose an output on a writable disk",
    errno.ENOSPC: "the disk is full; free some space or choose an output on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose an output on another disk",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system; choose a shorter name",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose a path under a folder",
    errno.EACCES: "permission denied; choose an output you may write to",
    errno.EPERM: "permission denied; choose an output you may write to",
    errno.EEXIST: "it appeared while this run was writing (another run?); choose a new path or pass --overwrite",
    errno.ENOTEMPTY: "it appeared while this run was writing (another run?); choose a new path or pass --overwrite",
}


def write_failure(error: OSError) -> UsageError:
    """One line for an OSError raised while writing an output: what failed, where, and the fix."""
    reason = WRITE_FAILURES.get(error.errno or 0, f"{error.strerror or error}; check the output path")
    where = "the output" if error.filename is None else _STAGING_NAME.sub(r"\1", os.fsdecode(error.filename))
    return UsageError(f"cannot write {where}: {reason}")


# ``.NAME.partial-PID`` (see :func:`_staging_path`): a user knows the output as NAME
_STAGING_NAME = re.compile(r"\.([^/]+)\.partial-\d+")


@contextmanager
def writing() -> Iterator[None]:
    """Turn an OSError raised while writing an output into a one-line :class:`UsageError`
    (:func:`write_failure`); every atomic writer here runs its block inside it."""
    try:
        yield
    except UsageError:
        raise
    except OSError as error:
        raise write_failure(error) from error


def _resolved(path: str | Path, flag: str) -> Path:
    """``path`` with ``~``, symlinks and ``..`` resolved; an empty name (``--out ""``, which would
    otherwise mean the current directory) is refused."""
    if not str(path).strip():
        raise UsageError(f"{flag} is empty; give the path of the output to write")
    return Path(path).expanduser().resolve()


def check_not_an_input(target: Path, protected: Iterable[str | Path], flag: str = "output", *,
                       replaced: bool = True) -> None:
    """Refuse an output that is, contains or lies inside an input, whatever ``--overwrite`` says:
    replacing it would destroy what the run reads (symlinks and ``..`` resolved on both sides).
    An output that is not ``replaced`` as a whole (a folder the run only adds its own files to)
    may contain an input."""
    for guarded in protected:
        guarded_path = Path(guarded).expanduser().resolve()
        if target == guarded_path or guarded_path in target.parents:
            raise UsageError(f"{flag} {target} is or lies inside the input {guarded_path}; "
                             "choose an output outside the input")
        if replaced and target in guarded_path.parents:
            raise UsageError(f"{flag} {target} contains the input {guarded_path}; "
                             "choose an output outside the input")


def _check_writable_parent(target: Path) -> None:
    """Refuse a path under a regular file, or on a disk this process cannot write, before any work."""
    probe = target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write {target}: {probe} is a file, not a folder; choose a path under a folder")
    if not os.access(probe, os.W_OK):
        reason = WRITE_FAILURES[errno.EROFS if _read_only(probe) else errno.EACCES]
        raise UsageError(f"cannot write {target}: {reason}")


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def _is_protected_place(target: Path) -> bool:
    """The current directory, a home directory, a filesystem root or a folder above one of them:
    never an output to replace, whatever they hold."""
    places = {Path.cwd().resolve(), Path.home().resolve()}
    return target.parent == target or any(target == place or target in place.parents for place in places)


def is_layerprune_folder(folder: Path) -> bool:
    """Whether ``folder`` is an output layerprune wrote: it holds a record (``layerprune.json``,
    ``run.json``, ``search.json``) that validates as one, not merely a file of that name."""
    return holds_record(folder)


def check_output_path(out: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = (),
                      flag: str = "--out") -> Path:
    """Validate an output folder before any work starts; returns it resolved.

    The rules, for every folder any command writes: never an input (:func:`check_not_an_input`);
    an existing folder only with ``overwrite``, and then only one layerprune wrote or an empty one
    (never the current directory, a home directory or a root); its parent must be a writable folder.
    """
    target = _resolved(out, flag)
    if _is_protected_place(target):
        raise UsageError(f"{flag} {target} is {NOT_OURS}")
    check_not_an_input(target, protected, "output folder")
    recover_interrupted(target)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OptionError.about("overwrite", f"is off and the output {target} already exists; choose a new path "
                                                 "or turn it on")
        if not target.is_dir():
            raise UsageError(f"output {target} exists and is not a folder; choose another path")
        if not (is_layerprune_folder(target) or not any(target.iterdir())):
            raise UsageError(f"{flag} {target} is {NOT_OURS}")
    _check_writable_parent(target)
    return target


def check_scratch_folder(folder: str | Path, *, protected: Iterable[str | Path] = (), flag: str) -> Path:
    """Validate a folder a command keeps working files in (``--spill-dir``, ``--checkpoint-dir``):
    never an input nor inside one; a folder (existing or not) on a writable disk. Such a folder is
    shared, not replaced (the command adds only its own files), so it may contain an input."""
    target = _resolved(folder, flag)
    check_not_an_input(target, protected, flag, replaced=False)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {target} is a file, not a folder; choose a folder")
    _check_writable_parent(target / "probe")
    return target


def is_layerprune_file(path: Path) -> bool:
    """Whether ``path`` is a results file layerprune wrote, by its content: a JSON record that validates
    as one layerprune writes (scores, evaluation), a PNG whose ``Software`` text is layerprune's, or a
    Markdown report opening with :data:`MARKDOWN_MARK`. Any other file is the user's (a JSON of their
    own, their notes, a picture), and overwriting does not replace it."""
    if path.suffix == ".json":
        return is_record_file(path)
    try:
        if path.suffix == ".png":
            return _png_software(path.read_bytes()) == PNG_SOFTWARE
        if path.suffix == ".md":
            with path.open(encoding="utf-8") as handle:
                return handle.readline().rstrip("\n") == MARKDOWN_MARK
    except (OSError, UnicodeDecodeError):
        return False
    return False


def _png_software(data: bytes) -> str | None:
    """The ``Software`` keyword's text of a PNG (its tEXt chunks), if any."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    position = 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"tEXt":
            keyword, _, text = data[position + 8:position + 8 + length].partition(b"\0")
            if keyword == b"Software":
                return text.decode("latin-1")
        if kind == b"IEND":
            break
        position += 12 + length
    return None


def check_output_file(path: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = (),
                      flag: str = "--output") -> Path:
    """Validate an output file (``--output``, ``--plot``, or a file written beside one) before any work
    starts; returns it resolved.

    As :func:`check_output_path` for folders: never inside or containing an input, an existing one
    only with ``overwrite`` and only if layerprune wrote it (:func:`is_layerprune_file`, by content).
    """
    target = _resolved(path, flag)
    check_not_an_input(target, protected, f"{flag}")
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; give a file name such as {target / 'results.json'}")
    if target.exists():
        if not overwrite:
            raise OptionError.about("overwrite", f"is off and {target} already exists; choose a new path or turn it "
                                                 "on")
        if not target.is_file() or not is_layerprune_file(target):
            raise UsageError(f"{flag} {target} is {NOT_OURS}")
    _check_writable_parent(target)
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
    with writing():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _staging_dir(target) as staging:
            yield staging
            apply_umask(staging)
            _publish(staging, target, partial(_swap_into_place, overwrite=overwrite))


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
            _publish(staging, folder, os.replace)


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


def _renameat2(first: Path, second: Path, flags: int) -> bool:
    """Linux ``renameat2(first, second, flags)``; False where the platform or file system cannot
    (the caller then falls back to plain renames), an OSError where it refused."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one atomic step (``RENAME_EXCHANGE``)."""
    return _renameat2(first, second, 2)


def _rename_no_replace(staging: Path, target: Path) -> None:
    """Move ``staging`` (a file or a folder) to ``target`` unless something appeared there meanwhile
    (another run writing the same output): then fail with EEXIST and leave that one alone.
    ``RENAME_NOREPLACE`` where the kernel has it; elsewhere a file is hard-linked (``link`` refuses
    an existing name) and a folder renamed (``rename`` refuses a non-empty destination)."""
    if _renameat2(staging, target, 1):
        return
    if target.exists():
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    if staging.is_dir():
        os.rename(staging, target)
    else:
        os.link(staging, target)
        staging.unlink()


def _swap_into_place(staging: Path, target: Path, *, overwrite: bool = True) -> None:
    """Make ``staging`` the ``target``; there is no moment at which neither exists. Without
    ``overwrite``, an output that appeared since the start is never replaced."""
    if not overwrite or not target.exists():
        _rename_no_replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
        return
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _publish(staging: Path, target: Path, rename: Callable[[Path, Path], None]) -> None:
    """Move the finished ``staging`` file or folder to ``target`` with ``rename``, durably.

    A rename alone survives ``kill -9`` but not a power loss: the file system may commit the new
    name before the data it points to, or forget the rename. So every file and folder staged is
    flushed first (the name then can only ever point at complete data), and the folder that holds
    ``target`` after (the rename, and with it the new output, is on disk when the write returns).
    """
    if staging.is_dir():
        for folder, _, files in os.walk(staging, topdown=False):
            for name in files:
                _fsync(Path(folder, name))
            _fsync(Path(folder))
    else:
        _fsync(staging)
    rename(staging, target)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    """Flush ``path``, a file or a folder (its entries), to disk; a symlink is left alone (it is not
    followed: its target is not part of the output)."""
    if path.is_symlink():
        return
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
        raise OptionError.about("overwrite", f"is off and {target} already exists; choose a new path or turn it on")
    with writing():
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted(target)
        staging = _staging_path(target)
        try:
            yield staging
            _publish(staging, target, os.replace if overwrite else _rename_no_replace)
        finally:
            staging.unlink(missing_ok=True)
