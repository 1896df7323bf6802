"""``heal --data self-generated``: the rows are the original's greedy continuations of the drawn
prompts (loss on the continuation only), deterministic for a seed and read back from the cache; a
changed original misses it; every training method heals on them and records the prompts, the
settings and the tokens; bad input is refused naming the option (exit 2 on the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerprune.cli.main import main
from layerprune.data.prompts import draw_prompts
from layerprune.errors import OptionError
from layerprune.healing import heal, self_generated
from layerprune.healing.base import HealConfig
from layerprune.healing.data import IGNORE_INDEX
from layerprune.models.generation import greedy_continuations
from tests.healing.conftest import pruned_pair
from tests.helpers import save_tiny_checkpoint

SETTINGS = dict(prompts=None, prompt_tokens=6, seq_len=16, steps=6, batch_size=4, lr=5e-3, seed=3)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(" ".join(f"The river {i} runs past the old mill and on to the sea." for i in range(60)))
    return path


@pytest.fixture
def generation_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The continuations go to this test's own cache folder, out of the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(self_generated, "cache_dir", lambda: folder)
    return folder / self_generated.CACHE_FOLDER


def _continuation_loss(model: torch.nn.Module, rows) -> float:
    """Mean next-token loss over the labelled (continuation) tokens of ``rows``, by the definition."""
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows.labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX).item()


def _config(prompts: Path, **overrides) -> HealConfig:
    return HealConfig(method="lora", data="self-generated", **{**SETTINGS, "prompts": str(prompts), **overrides})


def test_rows_are_the_originals_greedy_continuations_cached_and_deterministic(prompts_file, generation_cache,
                                                                                monkeypatch) -> None:
    original, _ = pruned_pair()
    rows, record = self_generated.self_generated_rows(original, _config(prompts_file), 8)
    prompts = draw_prompts(original.tokenizer, prompts_file, count=8, prompt_tokens=6, split="train", seed=3)
    said = greedy_continuations(original.model, prompts, 16 - 6, original.tokenizer.eos_token_id)
    for row, labels, prompt, continuation in zip(rows.input_ids, rows.labels, prompts, said):
        assert row[:len(prompt) + len(continuation)].tolist() == prompt + continuation
        assert labels[:len(prompt)].tolist() == [IGNORE_INDEX] * len(prompt)  # the prompt is context only
        assert labels[len(prompt):len(prompt) + len(continuation)].tolist() == continuation
    assert record["generated_tokens"] == sum(map(len, said))
    assert record["prompts"] == str(prompts_file) and record["prompt_tokens"] == 6 and record["seed"] == 3
    assert record["decoding"] == "greedy" and record["rows"] == 8
    cached = generation_cache / f"{record['cache_key']}.json"
    written = cached.read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("a cache hit generates nothing")

    monkeypatch.setattr(self_generated, "greedy_continuations", no_generation)
    again, record_again = self_generated.self_generated_rows(original, _config(prompts_file), 8)
    assert torch.equal(again.input_ids, rows.input_ids) and torch.equal(again.labels, rows.labels)
    assert record_again == record
    monkeypatch.setattr(self_generated, "greedy_continuations", greedy_continuations)
    cached.unlink()  # generated afresh: the same bytes for the same seed
    self_generated.self_generated_rows(original, _config(prompts_file), 8)
    assert cached.read_bytes() == written
    _, other_seed = self_generated.self_generated_rows(original, _config(prompts_file, seed=4), 8)
    assert other_seed["cache_key"] != record["cache_key"]
    with torch.no_grad():
        original.model.lm_head.weight[0, 0] += 1.0  # the same name, other weights: not the cached words
    assert self_generated.cache_key(original, self_generated.generation_settings(_config(prompts_file), 8)) \
        != record["cache_key"]


@pytest.mark.parametrize("method, options", [("lora", {}), ("partial-ft", {"train_layers": 2}),
                                             ("partial-ft", {"train_layers": 2, "distill": True})])
def test_every_method_heals_on_self_generated_data_and_records_it(method, options, prompts_file,
                                                                   generation_cache) -> None:
    original, pruned = pruned_pair()
    rows, generated = self_generated.self_generated_rows(original, _config(prompts_file, steps=20, samples=16), 16)
    loss_before = _continuation_loss(pruned.model, rows)
    healed = heal(pruned, method, "self-generated", original=original,
                  **{**SETTINGS, "prompts": str(prompts_file), "steps": 20, "samples": 16}, **options)
    entry = healed.lineage["healing"][-1]
    data = entry["data"]
    assert data["source"] == "self-generated" and data["prompts"] == str(prompts_file)
    assert data["rows"] == 16 and data["seq_len"] == 16 and data["cache_key"] == generated["cache_key"]
    assert data["generated_tokens"] > 0 and data["original"] == original.source
    assert entry["config"]["prompts"] == str(prompts_file) and entry["config"]["prompt_tokens"] == 6
    assert entry["distill"] == bool(options.get("distill"))
    assert _continuation_loss(healed.model, rows) < loss_before - 0.05  # closer to the original's own words


def test_bad_self_generated_settings_are_refused_naming_the_option(prompts_file) -> None:
    with pytest.raises(OptionError, match="prompts is needed with data self-generated"):
        HealConfig(method="lora", data="self-generated")
    with pytest.raises(OptionError, match="prompts applies to data self-generated only"):
        HealConfig(method="lora", data=str(prompts_file), prompts=str(prompts_file))
    with pytest.raises(OptionError, match="prompt_tokens 16 leaves no room"):
        _config(prompts_file, prompt_tokens=16)
    with pytest.raises(OptionError, match="sampling"):
        _config(prompts_file, sampling="stratified")


def test_cli_self_generated_without_prompts_or_with_missing_ones_exits_2(tmp_path, capsys) -> None:
    model = save_tiny_checkpoint(tmp_path / "model", num_layers=2)
    out = tmp_path / "healed"
    base = ["heal", "--model", str(model), "--original", str(model), "--method", "lora", "--data", "self-generated",
            "--out", str(out)]
    assert main(base) == 2
    assert "--prompts" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "gone.txt")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "gone.txt" in error[0]
    assert not out.exists()


def test_cli_heals_on_self_generated_data(tmp_path, prompts_file, generation_cache) -> None:
    model = save_tiny_checkpoint(tmp_path / "model", num_layers=3)
    out = tmp_path / "healed"
    assert main(["heal", "--model", str(model), "--original", str(model), "--method", "lora", "--data",
                 "self-generated", "--prompts", str(prompts_file), "--prompt-tokens", "6", "--seq-len", "16",
                 "--steps", "2", "--batch-size", "2", "--out", str(out)]) == 0
    entry = json.loads((out / "layerprune.json").read_text())["healing"][-1]
    assert entry["data"]["prompts"] == str(prompts_file) and entry["data"]["generated_tokens"] > 0
    assert len(list(generation_cache.glob("*.json"))) == 1
