"""benchmarks/gpu_check.py without a GPU: its comparisons against hand-computed cases, its refusal
to run without CUDA, and a dry run of every step on a tiny checkpoint (``--device cpu --quick``)."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.helpers import save_tiny_checkpoint, script_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return script_module(SCRIPT, "gpu_check_under_test")


def test_score_error_is_relative_to_the_largest_reference_value(gpu_check) -> None:
    assert gpu_check.relative_error([0.1, 0.52, 1.0], [0.1, 0.5, 1.0], "bi") == pytest.approx(0.02)
    # ppl compares log-perplexity: a 1% error on a perplexity of e^2 is log(1.01) / 2 of the scale
    assert gpu_check.relative_error([math.e, math.e**2 * 1.01], [math.e, math.e**2], "ppl") == pytest.approx(
        math.log(1.01) / 2)


def test_selection_passes_when_equal_or_a_near_tie_and_fails_otherwise(gpu_check) -> None:
    reference = [1.0, 0.30, 0.31, 0.9, 0.1]
    same, _ = gpu_check.equivalent_selection([1, 4], [1, 4], reference, "bi", 0.0)
    tie, _ = gpu_check.equivalent_selection([2, 4], [1, 4], reference, "bi", 0.05)  # +0.01 of scale 1.0
    strict, _ = gpu_check.equivalent_selection([2, 4], [1, 4], reference, "bi", 0.0)
    far, text = gpu_check.equivalent_selection([3, 4], [1, 4], reference, "bi", 0.05)  # +0.6
    assert same and tie and not strict and not far
    assert "[3, 4] vs [1, 4]" in text


def test_refuses_without_cuda_and_a_cpu_run_never_writes_the_repository_doc(gpu_check, capsys) -> None:
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 2
    assert "must not write docs/benchmarks.md" in capsys.readouterr().err


@pytest.mark.usefixtures("fresh_accelerator_state")  # it heals in bf16
def test_dry_run_exercises_every_step_on_a_tiny_checkpoint(gpu_check, tmp_path) -> None:
    model = str(save_tiny_checkpoint(tmp_path / "tiny", "llama"))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Scale\n\nkept as it was\n")
    status = gpu_check.main(["--device", "cpu", "--quick", "--models", model, "--doc", str(doc)])
    text = doc.read_text()
    assert "## Scale\n\nkept as it was" in text and "## GPU" in text and "### One-GPU check" in text
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {model} |")]
    checks = [row for row in rows if len(row) == 6]
    efficiency = [row for row in rows if len(row) == 8]
    assert {row[1] for row in checks} == {"score", "select", "perplexity", "export", "heal partial-ft", "heal lora",
                                          "heal qlora"}
    assert [row for row in checks if row[5] == "ERROR"] == []
    # CPU float32 against CPU float32: the same computation, so nothing may differ
    same_dtype = [row for row in checks if row[2].endswith("cpu float32") and row[1] in ("score", "select", "perplexity")]
    assert len(same_dtype) == 4 + 4 * 2 + 1 and all(row[5] == "ok" for row in same_dtype)
    assert [row[4] for row in checks if row[1] == "heal qlora"] == ["needs CUDA (bitsandbytes 4-bit kernels)"]
    assert {(row[1], row[2]) for row in efficiency} == {("bfloat16", "1"), ("bfloat16", "16"), ("float32", "1"),
                                                         ("float32", "16")}
    assert status == (1 if any(row[5] == "MISMATCH" for row in checks) else 0)
