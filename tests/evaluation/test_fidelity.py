"""Fidelity: KL(original || model) and top-1 agreement equal a direct computation on tiny models
(0 and 1 against itself), the top-k form is the coarsened KL with its stated gap, the window
interval covers the known value at about 95%, and ``evaluate`` records them against the original
the models came from (or refuses, naming ``reference``, when there is none)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerprune.api import save
from layerprune.cli.main import main
from layerprune.errors import OptionError
from layerprune.evaluation import evaluate
from layerprune.evaluation.fidelity import fidelity, token_agreement, token_kl
from layerprune.evaluation.intervals import ratio_interval
from layerprune.evaluation.perplexity import windows
from layerprune.models.editing import prune
from layerprune.models.loading import load_model
from layerprune.searching.fitness import TopK, kl_top_k
from tests.helpers import save_tiny_checkpoint, tiny_loaded

SEQ_LEN = 16


def _direct(reference: torch.nn.Module, candidate: torch.nn.Module, stream: torch.Tensor,
            seq_len: int = SEQ_LEN) -> tuple[float, float, int]:
    """Mean KL and agreement over every predicted token of every window, in float64 by the definition."""
    kl_total, agreed, tokens = 0.0, 0, 0
    for window in windows(stream, seq_len):
        with torch.no_grad():
            p = torch.softmax(reference(window[None]).logits[0, :-1].double(), dim=-1)
            q = torch.softmax(candidate(window[None]).logits[0, :-1].double(), dim=-1)
        kl_total += float((p * (p.log() - q.log())).sum())
        agreed += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += p.shape[0]
    return kl_total / tokens, agreed / tokens, tokens


def test_kl_and_agreement_equal_a_direct_computation_and_are_0_and_1_against_itself() -> None:
    original = tiny_loaded(num_layers=4)
    pruned = original.copy()
    prune(pruned, [1, 2])
    stream = torch.randint(0, 256, (5 * SEQ_LEN + 7,), generator=torch.Generator().manual_seed(0))
    measured = fidelity(original.model, {"pruned": pruned.model, "self": original.model}, stream, SEQ_LEN,
                        batch_size=2)
    kl, agreement, tokens = _direct(original.model, pruned.model, stream)
    assert measured["pruned"].tokens == tokens == 5 * (SEQ_LEN - 1) + 6
    assert measured["pruned"].kl == pytest.approx(kl, rel=1e-3) and kl > 1e-4
    assert measured["pruned"].top1_agreement == pytest.approx(agreement)
    assert measured["pruned"].kl_ci95[0] <= measured["pruned"].kl <= measured["pruned"].kl_ci95[1]
    assert measured["self"].kl == 0.0 and measured["self"].top1_agreement == 1.0
    assert measured["self"].kl_ci95 == (0.0, 0.0) and measured["self"].top1_agreement_ci95 == (1.0, 1.0)


def test_top_k_form_is_the_coarsened_kl_with_the_stated_gap() -> None:
    generator = torch.Generator().manual_seed(3)
    reference, candidate = torch.randn(2, 7, 50, generator=generator), torch.randn(2, 7, 50, generator=generator)
    exact = token_kl(reference, candidate)
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(candidate, -1)
    whole = TopK.of(log_p, 50)
    assert torch.allclose(kl_top_k(whole, log_q), exact, atol=1e-5)
    compact = TopK.of(log_p, 5)
    p, q = torch.softmax(reference.double(), -1), torch.softmax(candidate.double(), -1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, compact.indices, False)
    p_tail, q_tail = (p * tail).sum(-1), (q * tail).sum(-1)
    within = ((p / p_tail[..., None]) * ((p / p_tail[..., None]).log() - (q / q_tail[..., None]).log()) * tail).sum(-1)
    assert torch.allclose(compact.log_tail.exp().double(), p_tail, atol=1e-6)
    assert torch.allclose((exact.double() - kl_top_k(compact, log_q).double()), p_tail * within, atol=1e-4)
    assert (kl_top_k(compact, log_q) <= exact + 1e-5).all()
    assert torch.equal(candidate.argmax(-1) == compact.indices[..., 0], token_agreement(reference, candidate))


def test_window_interval_covers_the_known_mean_at_about_95_percent() -> None:
    """Windows of 40 tokens whose per-token values are exponential with mean 0.3 (a KL-like skew):
    the interval of the per-token mean over 30 windows covers 0.3 in about 95% of draws."""
    rng = np.random.default_rng(2)
    trials, covered = 200, 0
    for trial in range(trials):
        sums = rng.exponential(0.3, size=(30, 40)).sum(axis=1)
        low, high = ratio_interval(sums, [40] * 30, iterations=500, seed=trial)
        covered += low <= 0.3 <= high
    assert 0.90 <= covered / trials <= 0.99


def test_evaluate_compares_every_model_with_the_original_it_came_from(fake_data_layer) -> None:
    original = tiny_loaded(num_layers=4)
    pruned = original.copy()
    prune(pruned, [1, 2])
    report = evaluate(original, compare=[pruned], fidelity=(str(fake_data_layer),), ppl=(str(fake_data_layer),),
                      seq_len=64)
    entry = report["models"]["tiny-llama'"]["fidelity"][str(fake_data_layer)]
    assert entry["tokens"] == report["models"]["tiny-llama'"]["perplexity"][str(fake_data_layer)]["tokens"]
    assert entry["kl"] > 0 and 0 <= entry["top1_agreement"] <= 1
    assert "fidelity" not in report["models"]["tiny-llama"]  # the original is not compared with itself
    # a pruned model alone is compared with the source_model its lineage records: here, by name, a
    # reference given explicitly (the original's source is "tiny-llama", which cannot load)
    with pytest.raises(OptionError, match="reference"):
        evaluate(pruned, fidelity=(str(fake_data_layer),), seq_len=64)


def test_fidelity_without_an_original_exits_2(tmp_path, capsys) -> None:
    model = save_tiny_checkpoint(tmp_path / "model", num_layers=2)
    text = tmp_path / "text.txt"
    text.write_text("some words to score " * 40)
    code = main(["eval", "--model", str(model), "--fidelity", str(text), "--seq-len", "32",
                 "--output", str(tmp_path / "e.json")])
    assert code == 2
    assert "--reference" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_a_saved_cut_alone_is_compared_with_the_source_model_its_layerprune_json_records(tmp_path) -> None:
    original_dir = save_tiny_checkpoint(tmp_path / "original", num_layers=4)
    pruned = load_model(original_dir)
    prune(pruned, [1, 2])
    save(pruned, tmp_path / "pruned")
    text = tmp_path / "text.txt"
    text.write_text("some words to score " * 40)
    output = tmp_path / "e.json"
    assert main(["eval", "--model", str(tmp_path / "pruned"), "--fidelity", str(text), "--seq-len", "32",
                 "--output", str(output)]) == 0
    entry = json.loads(output.read_text())["models"][str(tmp_path / "pruned")]["fidelity"][str(text)]
    kl, agreement, tokens = _direct(load_model(original_dir).model, load_model(tmp_path / "pruned").model,
                                    # the file's one document, stripped, as the data layer reads it
                                    tiny_loaded().tokenizer(text.read_text().strip(), add_special_tokens=False,
                                                            return_tensors="pt")["input_ids"][0],
                                    seq_len=32)
    assert entry["original"] == str(original_dir)
    assert entry["tokens"] == tokens and entry["kl"] == pytest.approx(kl, rel=1e-3)
    assert entry["top1_agreement"] == pytest.approx(agreement)
    markdown = output.with_suffix(".md").read_text()
    assert f"| KL to original {text} | " in markdown and "top-1 agreement" in markdown
