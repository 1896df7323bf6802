"""``layerprune eval --runtime llamacpp``: perplexity in llama.cpp on the windows transformers scores,
and speed in alternating turns. Skipped, saying so, where llama-cpp-python is not installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import layerprune as lp
from layerprune.cli.main import main
from layerprune.evaluation.perplexity import perplexity
from layerprune.models.gguf_file import GGUF_FILE
from layerprune.records import is_record_file
from tests.helpers import tiny_loaded, write_corpus

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (layerprune[llamacpp])")


def test_perplexity_and_speed_of_two_gguf_files_in_llama_cpp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from llama_cpp import Llama

    from layerprune.evaluation.llamacpp import text_tokens

    loaded = tiny_loaded("llama", 6)
    full = lp.save(loaded, tmp_path / "full", format="gguf")
    lp.prune(loaded, [1, 2, 3])
    cut = lp.save(loaded, tmp_path / "cut", format="gguf")
    corpus = write_corpus(tmp_path / "corpus.txt")
    output = tmp_path / "llamacpp.json"
    code = main(["eval", "--runtime", "llamacpp", "--model", str(full / GGUF_FILE), "--compare", str(cut),
                 "--ppl", str(corpus), "--seq-len", "32", "--max-windows", "4", "--efficiency", "--prompt-len", "16",
                 "--new-tokens", "8", "--repeats", "1", "--threads", "1", "--turns", "2", "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert is_record_file(output) and output.with_suffix(".md").is_file()
    assert report["measured"]["threads"] == 1
    reference, pruned = report["models"]
    assert pruned["speed"]["timings"] == 2 and pruned["speed"]["threads"] == 1
    assert reference["speed"]["decode_speedup"] == 1.0
    weights = sum(p.numel() for n, p in loaded.model.named_parameters() if "embed_tokens" not in n)
    assert pruned["speed"]["matmul_weights"] == weights  # the tiny model ties its head: counted once
    # the same windows in transformers: llama.cpp's tokens of the text, scored by the pruned float model
    llm = Llama(model_path=str(cut / GGUF_FILE), n_ctx=32, verbose=False, logits_all=True)
    ids, prefix = text_tokens(llm, str(corpus))
    llm.close()
    expected = perplexity(loaded.model, torch.tensor(ids), 32, max_windows=4, prefix=prefix)
    assert pruned["perplexity"][str(corpus)]["tokens"] == expected.tokens
    assert pruned["perplexity"][str(corpus)]["ppl"] == pytest.approx(expected.ppl, rel=1e-3)
    assert "ideal x" in capsys.readouterr().out


def test_a_model_that_is_no_gguf_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["eval", "--runtime", "llamacpp", "--model", str(tmp_path / "empty"), "--ppl", "wiki-sample",
                 "--output", str(tmp_path / "r.json")])
    assert code == 2 and "holds 0 .gguf files" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]
