"""Fixtures for the reliability suite: small checkpoints on disk (good and broken) and a CLI runner
that sees exactly what a user would: the exit code and everything written to stdout and stderr."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from layerprune.cli.main import main
from layerprune.models.tiny import byte_tokenizer, tiny_model
from tests.helpers import save_tiny_checkpoint

TINY_LAYERS = 4


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``layerprune ARGS`` in this process (saving the ~7 s interpreter start of a subprocess).

    Output is captured at the file-descriptor level, so warnings and progress bars count too. An
    exception that escapes ``main`` fails the test: that is the traceback a user must never see.
    """

    def run(*argv: str | Path) -> CliResult:
        capfd.readouterr()
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capfd.readouterr()
        return CliResult(int(code or 0), out, err)

    return run


def assert_refused(result: CliResult, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("layerprune ") and ": error: " in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (hidden ones too) with its size and mtime."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size if path.is_file() else -1, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A healthy 4-layer tiny Llama checkpoint; tests check that nothing ever writes into it."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_layers=TINY_LAYERS)


def _copy_of(good: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    for item in good.iterdir():
        (where / item.name).write_bytes(item.read_bytes())
    return where


def _gguf_bytes(folder: Path) -> bytes:
    """A small, structurally valid GGUF file (header, metadata, one tensor)."""
    import gguf

    path = folder / "valid.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture(scope="session")
def broken(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs that must be refused with a clear message, each built from the healthy checkpoint."""
    root = tmp_path_factory.mktemp("broken")
    models: dict[str, Path] = {}

    corrupt_config = _copy_of(tiny_dir, root / "corrupt-config")
    (corrupt_config / "config.json").write_text('{"model_type": "llama", ')
    models["corrupt config.json"] = corrupt_config

    random_weights = _copy_of(tiny_dir, root / "random-safetensors")
    (random_weights / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    models["random bytes as safetensors"] = random_weights

    truncated = _copy_of(tiny_dir, root / "truncated-safetensors")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    models["truncated safetensors"] = truncated

    no_weights = _copy_of(tiny_dir, root / "no-weights")
    (no_weights / "model.safetensors").unlink()
    models["config but no weights"] = no_weights

    empty = root / "empty"
    empty.mkdir()
    models["folder without config.json"] = empty

    gguf_data = _gguf_bytes(root)
    (root / "random.gguf").write_bytes(np.random.default_rng(1).bytes(4096))
    models["random bytes named .gguf"] = root / "random.gguf"
    for cut in (30, 200, len(gguf_data) - 100):
        (root / f"truncated-{cut}.gguf").write_bytes(gguf_data[:cut])
        models[f"GGUF truncated to {cut} bytes"] = root / f"truncated-{cut}.gguf"
    (root / "nonsense.gguf").write_bytes(gguf_data)  # complete, but its metadata make no valid model
    models["GGUF with invalid metadata"] = root / "nonsense.gguf"
    return models


@pytest.fixture(scope="session")
def pickle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its weights only as a pickle (``pytorch_model.bin``)."""
    folder = tmp_path_factory.mktemp("pickle") / "model"
    model = tiny_model("llama", TINY_LAYERS)
    model.config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def remote_code_dir(tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose config asks for custom code that, if imported, creates a marker file."""
    folder = _copy_of(tiny_dir, tmp_path / "remote")
    marker = tmp_path / "code-was-run"
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "homemade"
    config["auto_map"] = {"AutoConfig": "homemade.HomemadeConfig", "AutoModelForCausalLM": "homemade.HomemadeModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "homemade.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class HomemadeConfig(LlamaConfig):\n    model_type = 'homemade'\n"
        "class HomemadeModel(LlamaForCausalLM):\n    config_class = HomemadeConfig\n"
    )
    return folder, marker


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if weights are read: the refusal must come before the expensive load."""

    class _Refuse:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            raise AssertionError("weights were loaded although the input could be refused from the config")

    monkeypatch.setattr("layerprune.models.loading.AutoModelForCausalLM", _Refuse)


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
