"""Generation agreement equals a hand count on constructed continuations and on the tiny models'
own greedy continuations; prompts are drawn reproducibly, in the chat template's form where the
tokenizer has one; ``--generation 0`` and prompts with no text after the template exit 2."""

from __future__ import annotations

import json

import pytest

from layerprune.cli.main import main
from layerprune.data.prompts import draw_prompts
from layerprune.errors import OptionError
from layerprune.evaluation import evaluate
from layerprune.evaluation.against_original import PROMPT_SEED
from layerprune.evaluation.generation import generation_agreement
from layerprune.models.editing import prune
from layerprune.models.generation import greedy_continuations
from layerprune.models.tiny import byte_tokenizer
from tests.helpers import save_tiny_checkpoint, tiny_loaded

TRIMMING_TEMPLATE = "{% for m in messages %}<user>{{ m['content'] | trim }}</user>{% endfor %}<model>"


def test_agreement_equals_a_hand_count() -> None:
    original = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [1, 1]]
    model = [[1, 2, 9, 4], [5, 6], [0, 8, 9], [1, 1, 258]]  # the last runs on where the original ended
    assert generation_agreement(original, model) == {"prompts": 4, "mean_agreed_tokens": (2 + 2 + 0 + 2) / 4,
                                                     "identical": 1 / 4}


def test_evaluate_counts_agreement_on_the_models_own_continuations(tmp_path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("Once upon a time there was a small model that wanted to speak. " * 20)
    original = tiny_loaded(num_layers=4)
    pruned = original.copy()
    prune(pruned, [2])
    report = evaluate(original, compare=[pruned, original.copy()], generation=4, generation_prompts=str(text),
                      prompt_tokens=8, generation_tokens=6)
    prompts = draw_prompts(original.tokenizer, text, count=4, prompt_tokens=8, split="test", seed=PROMPT_SEED)
    ours = greedy_continuations(original.model, prompts, 6, original.tokenizer.eos_token_id)
    theirs = greedy_continuations(pruned.model, prompts, 6, original.tokenizer.eos_token_id)
    agreed = []
    for a, b in zip(ours, theirs):  # a hand count of the common prefix
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        agreed.append(same)
    cut = report["models"]["tiny-llama'"]["generation"]
    assert cut["mean_agreed_tokens"] == pytest.approx(sum(agreed) / 4)
    assert cut["identical"] == sum(a == b for a, b in zip(ours, theirs)) / 4
    assert cut["examples"][0]["original"] == original.tokenizer.decode(ours[0], skip_special_tokens=True)
    assert cut["examples"][0]["model"] == original.tokenizer.decode(theirs[0], skip_special_tokens=True)
    copy = report["models"]["tiny-llama''"]["generation"]
    assert copy["identical"] == 1.0 and copy["mean_agreed_tokens"] == pytest.approx(sum(map(len, ours)) / 4)
    assert "generation" not in report["models"]["tiny-llama"]


def test_prompts_are_reproducible_and_templated_for_a_chat_tokenizer(tmp_path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("abcdefghij " * 50)
    tokenizer = byte_tokenizer()
    plain = draw_prompts(tokenizer, text, count=3, prompt_tokens=5, split="test", seed=1)
    assert plain == draw_prompts(tokenizer, text, count=3, prompt_tokens=5, split="test", seed=1)
    assert all(len(prompt) == 5 for prompt in plain)
    tokenizer.chat_template = TRIMMING_TEMPLATE
    chat = draw_prompts(tokenizer, text, count=3, prompt_tokens=5, split="test", seed=1)
    assert [tokenizer.decode(prompt) for prompt in chat] == [
        f"<user>{byte_tokenizer().decode(prompt).strip()}</user><model>" for prompt in plain]


def test_prompts_with_no_text_after_the_template_are_refused(tmp_path) -> None:
    text = tmp_path / "spaces.txt"
    text.write_text("a" + " " * 300 + "b")
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TRIMMING_TEMPLATE
    with pytest.raises(OptionError, match="no token of text after the chat template"):
        draw_prompts(tokenizer, text, count=4, prompt_tokens=1, split="test", seed=0)


def test_bad_generation_input_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    model = save_tiny_checkpoint(tmp_path / "model", num_layers=2)
    output = tmp_path / "e.json"
    assert main(["eval", "--model", str(model), "--compare", str(model), "--generation", "0",
                 "--output", str(output)]) == 2
    assert "--generation" in capsys.readouterr().err
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TRIMMING_TEMPLATE
    tokenizer.save_pretrained(model)
    text = tmp_path / "spaces.txt"
    text.write_text("a" + " " * 300 + "b")
    assert main(["eval", "--model", str(model), "--compare", str(model), "--generation", "2",
                 "--generation-prompts", str(text), "--prompt-tokens", "1", "--output", str(output)]) == 2
    assert "--prompt-tokens" in capsys.readouterr().err
    assert not output.exists()
    assert main(["eval", "--model", str(model), "--compare", str(model), "--generation", "2",
                 "--generation-prompts", str(text), "--prompt-tokens", "301", "--generation-tokens", "4",
                 "--output", str(output)]) == 0
    assert json.loads(output.read_text())["models"][f"{model}'"]["generation"]["identical"] == 1.0
    assert "### Generation:" in output.with_suffix(".md").read_text()
