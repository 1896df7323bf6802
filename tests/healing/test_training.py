"""The training loop's promises: resume equals an uninterrupted run, two processes equal one, the
losses match a straightforward reference, and bad input fails early with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerprune.errors import UsageError
from layerprune.healing import TrainingSet, engine, heal
from layerprune.healing.base import DistillOptions
from layerprune.healing.data import IGNORE_INDEX, instruction_rows, is_instruction_file
from layerprune.healing.objectives import token_loss_sums
from layerprune.models.tiny import byte_tokenizer
from tests.healing.conftest import pruned_pair, training_rows
from tests.healing.distributed_run import healed_state, training_options
from tests.helpers import tiny_loaded

ROOT = Path(__file__).resolve().parents[2]


def _heal_state(method: str, **options) -> dict[str, torch.Tensor]:
    original, pruned = pruned_pair()
    healed = heal(pruned, method, training_rows(), original=original, **(training_options(method) | options))
    return healed.model.state_dict()


@pytest.mark.usefixtures("pair_cache")
@pytest.mark.parametrize("method", ["partial-ft", "lora", "replace-ffn"])
def test_resume_after_interruption_equals_uninterrupted_run(method: str, tmp_path, monkeypatch) -> None:
    uninterrupted = _heal_state(method)
    checkpoints = tmp_path / "checkpoints"
    real_rows = engine.global_rows

    def crash_at_step_5(step: int, *args):
        if step == 5:
            raise KeyboardInterrupt
        return real_rows(step, *args)

    monkeypatch.setattr(engine, "global_rows", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _heal_state(method, checkpoint_dir=checkpoints, checkpoint_every=4)
    monkeypatch.setattr(engine, "global_rows", real_rows)
    resumed = _heal_state(method, checkpoint_dir=checkpoints, checkpoint_every=4, resume=True)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_resume_refuses_a_missing_or_different_checkpoint(tmp_path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        _heal_state("partial-ft", checkpoint_dir=tmp_path, resume=True)
    _heal_state("partial-ft", checkpoint_dir=tmp_path, checkpoint_every=3)
    with pytest.raises(UsageError, match="different lr"):
        _heal_state("partial-ft", checkpoint_dir=tmp_path, resume=True, lr=1e-3)


@pytest.mark.usefixtures("pair_cache")
@pytest.mark.parametrize("method", ["partial-ft", "replace-ffn"])
def test_two_cpu_processes_match_one(method: str, tmp_path) -> None:
    out = tmp_path / "two.pt"
    # `--cpu` would make accelerate 1.x start one process; `--multi_gpu` on a machine without GPUs
    # starts two, and ACCELERATE_USE_CPU=1 makes them join as CPU/gloo processes.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "tests" / "healing" / "distributed_run.py"), method, str(out)]
    # src first: the launched processes must import this checkout's layerprune, not an installed one
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1",
                        "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["processes"] == 2
    two = saved["state"]
    one = healed_state(method)
    changed = [k for k in one if not torch.equal(one[k], tiny_loaded().model.state_dict().get(k, one[k]))]
    assert changed, "training changed nothing, so the comparison would be empty"
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=2e-5)  # a different global batch moves weights by ~1e-1


def test_loss_matches_reference_cross_entropy_and_kl() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 2, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    keep = labels[:, 1:] != IGNORE_INDEX
    s, t, y = student[:, :-1][keep], teacher[:, :-1][keep], labels[:, 1:][keep]
    ce = F.cross_entropy(s, y, reduction="sum")
    kl = sum((t[i].softmax(-1) * (t[i].log_softmax(-1) - s[i].log_softmax(-1))).sum() for i in range(len(y)))
    plain = DistillOptions()
    torch.testing.assert_close(token_loss_sums(student, labels, None, plain), ce)
    mixed = DistillOptions(distill=True, distill_weight=0.25)
    torch.testing.assert_close(token_loss_sums(student, labels, teacher, mixed), 0.75 * ce + 0.25 * kl)
    only_kl = DistillOptions(distill=True, distill_weight=1.0)
    assert token_loss_sums(student, labels, student, only_kl).abs() < 1e-5


def test_instruction_rows_train_on_the_response_only(tmp_path) -> None:
    tokenizer = byte_tokenizer()
    rows = instruction_rows(tokenizer, [("Q: 2+2?\nA: ", "4"), ("Say hi.\n", "hi there")], 16, "test")
    first_prompt = len(tokenizer("Q: 2+2?\nA: ")["input_ids"])
    assert (rows.labels[0, :first_prompt] == IGNORE_INDEX).all()
    response = tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows.labels[0, first_prompt:first_prompt + len(response)].tolist() == response
    assert (rows.labels[0, first_prompt + len(response):] == IGNORE_INDEX).all()
    assert rows.attention_mask[0].sum() == first_prompt + len(response)
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add", "input": "2+2", "output": "4"}) + "\n")
    plain = tmp_path / "texts.jsonl"
    plain.write_text(json.dumps({"text": "hello"}) + "\n")
    assert is_instruction_file(alpaca) and not is_instruction_file(plain)


def test_padded_instruction_rows_heal() -> None:
    """Padding is invisible to training: other tokens in the padded positions change neither the
    losses nor the healed weights (they would if padding leaked into the loss or the attention)."""
    rows = instruction_rows(byte_tokenizer(), [(f"Q{i}: ", "answer " * (i % 3 + 1)) for i in range(8)], 24, "test")
    padding = rows.attention_mask == 0
    assert padding.any() and (rows.labels[padding] == IGNORE_INDEX).all()
    noise = torch.randint(0, 256, rows.input_ids.shape, generator=torch.Generator().manual_seed(1))
    noisy_rows = TrainingSet(torch.where(padding, noise, rows.input_ids), rows.attention_mask, rows.labels, "noisy")
    assert not torch.equal(noisy_rows.input_ids, rows.input_ids)

    def healed_with(training: TrainingSet) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        original, pruned = pruned_pair()
        healed = heal(pruned, "partial-ft", training, original=original, steps=4, batch_size=4, distill=True)
        step = healed.lineage["healing"][-1]
        return {key: step[key] for key in ("first_loss", "final_loss")}, healed.model.state_dict()

    (losses, weights), (noisy_losses, noisy_weights) = healed_with(rows), healed_with(noisy_rows)
    assert all(torch.isfinite(torch.tensor(value)) and value > 0 for value in losses.values()), losses
    assert noisy_losses == pytest.approx(losses, rel=1e-6)
    for name, tensor in weights.items():
        torch.testing.assert_close(noisy_weights[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [("partial-ft", dict(steps=0), "steps must be at least 1"),
     ("partial-ft", dict(train_layers=9), "exceeds the model's 4 layers"),
     ("replace-ffn", dict(distill=True), "not available for replace-ffn"),
     ("lora", dict(distill_weight=2.0), "^distill_weight must be at most 1"),
     ("lora", dict(batch_size=4, samples=2), "at least the batch size"),
     ("partial-ft", dict(checkpoint_every=5), "^checkpoint_dir is needed to checkpoint"),
     ("no-such", {}, "choose one of"),
     ("qlora", {}, "qlora needs")],
)
def test_bad_input_fails_before_training(method: str, options: dict, message: str) -> None:
    original, pruned = pruned_pair()
    if method == "qlora" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match=message):
        heal(pruned, method, training_rows(), original=original, **options)


def test_replacement_needs_a_single_run_or_a_block() -> None:
    import layerprune as lp

    pruned = tiny_loaded()
    lp.prune(pruned, [0, 1, 3, 4])
    with pytest.raises(UsageError, match="removed runs are: 0-1, 3-4"):
        heal(pruned, "replace-ffn", training_rows(), original=tiny_loaded())
    with pytest.raises(UsageError, match="teacher is unknown"):
        heal(tiny_loaded(), "partial-ft", training_rows(), distill=True)


def test_training_set_shapes_are_checked() -> None:
    with pytest.raises(UsageError, match="same"):
        TrainingSet(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
                    torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_a_model_healed_under_bf16_autocast_computes_as_its_export_will() -> None:
    """accelerate wraps the trained model's forward in the autocast; the healed model must not keep it."""
    _, pruned = pruned_pair()
    healed = heal(pruned, "partial-ft", training_rows(), steps=2, batch_size=4, precision="bfloat16")
    _, reloaded = pruned_pair()
    reloaded.model.load_state_dict(healed.model.state_dict())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(healed.model(input_ids=ids).logits, reloaded.model(input_ids=ids).logits)
