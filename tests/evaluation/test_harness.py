"""lm-eval on an offline task with a tiny in-memory model, and stability from its predictions."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import layerprune as lp
from layerprune.errors import UsageError
from layerprune.evaluation.harness import OFFLINE_TASKS, chance_rate, predictions_from_samples, run_tasks, write_offline_task
from layerprune.evaluation.stability import stability, stability_by_task
from tests.evaluation.conftest import letters_task
from tests.helpers import tiny_loaded

TASK = "lp_sentiment_rt"


def _reference_predictions(loaded: lp.LoadedModel, data) -> list[int]:
    """The choice with the highest summed log-probability of its tokens after the prompt."""
    tokenizer = loaded.tokenizer
    predictions = []
    for text in data.texts:
        context = tokenizer(f"Review: {text}\nSentiment:", add_special_tokens=False)["input_ids"]
        scores = []
        for choice in data.label_names:
            continuation = tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(loaded.model(ids).logits[0].double(), -1)
            scores.append(sum(logprobs[len(context) + i - 1, token].item() for i, token in enumerate(continuation)))
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions


@pytest.fixture(scope="module")
def task_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    write_offline_task(OFFLINE_TASKS[TASK], letters_task(12, seed=3), root)
    return root


def test_lm_eval_offline_task_matches_a_hand_computation(task_root, tmp_path, monkeypatch, capfd) -> None:
    loaded = tiny_loaded(num_layers=2)
    data = letters_task(12, seed=3)
    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval's `git describe` would complain there
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    run = run_tasks(loaded.model, loaded.tokenizer, [TASK], batch_size=4, include_path=task_root)
    assert "fatal" not in capfd.readouterr().err
    # the run leaves the hub settings as the user set them: a later hub download here is not forced offline
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    expected = _reference_predictions(loaded, data)
    assert run.predictions[TASK] == expected
    assert run.metrics[TASK]["acc"] == pytest.approx(sum(p == y for p, y in zip(expected, data.labels)) / 12)
    assert run.metrics[TASK]["chance"] == pytest.approx(1 / len(data.label_names))  # two choices per document


def test_stability_of_a_model_with_itself_is_one_and_a_pruned_model_differs(task_root) -> None:
    loaded = tiny_loaded(num_layers=4)
    pruned = copy.deepcopy(loaded)
    lp.prune(pruned, [1, 2, 3])
    runs = [run_tasks(m.model, m.tokenizer, [TASK], include_path=task_root) for m in (loaded, loaded, pruned)]
    assert stability_by_task(runs[0].predictions, runs[1].predictions) == {TASK: 1.0}
    expected = sum(a == b for a, b in zip(runs[0].predictions[TASK], runs[2].predictions[TASK])) / 12
    assert stability_by_task(runs[0].predictions, runs[2].predictions) == {TASK: pytest.approx(expected)}


def test_stability_counts_agreement_not_correctness() -> None:
    assert stability([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert stability([1, 1], [1, 1]) == 1.0
    with pytest.raises(UsageError, match="same limit"):
        stability([0, 1], [0])


def test_predictions_are_the_argmax_choice_in_document_order() -> None:
    samples = [{"doc_id": 1, "filtered_resps": [(-3.0, False), (-1.0, True)]},
               {"doc_id": 0, "filtered_resps": [(-0.5, True), (-2.0, False), (-9.0, False)]}]
    assert predictions_from_samples(samples) == [0, 1]
    assert predictions_from_samples([{"doc_id": 0, "filtered_resps": ["generated text"]}]) == []


def test_chance_rate_is_a_uniform_guess_over_each_documents_choices() -> None:
    samples = [{"filtered_resps": [[-1.0, False]] * 3}, {"filtered_resps": [[-1.0, False]] * 2},
               {"filtered_resps": [[-2.0, True]]}]  # the last is a cloze: one loglikelihood, no guess to make
    assert chance_rate(samples) == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)


def test_offline_task_files_point_at_local_data(task_root) -> None:
    folder = task_root / TASK
    assert str(folder / "test.jsonl") in (folder / f"{TASK}.yaml").read_text()
    assert len((folder / "test.jsonl").read_text().splitlines()) == 12


def test_unknown_task_fails_before_any_work() -> None:
    loaded = tiny_loaded(num_layers=1)
    with pytest.raises(UsageError, match="unknown offline task"):
        run_tasks(loaded.model, loaded.tokenizer, ["lp_sentiment_typo"])


def _greedy(loaded: lp.LoadedModel, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        for _ in range(steps):
            ids = ids + [int(loaded.model(torch.tensor([ids])).logits[0, -1].argmax())]
    return ids[-steps:]


def _context_followed_by_a_word(loaded: lp.LoadedModel) -> tuple[str, str]:
    """A context after which the tiny model greedily writes " <letters>": a target it gets right."""
    rng = random.Random(0)
    space = loaded.tokenizer(" ", add_special_tokens=False)["input_ids"]
    for _ in range(5000):
        context = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 12))).strip()
        ids = loaded.tokenizer(context, add_special_tokens=False)["input_ids"]
        following = _greedy(loaded, ids, 3)
        word = loaded.tokenizer.decode(following[1:])
        if context and following[:1] == space and word.isalpha():
            return context, word
    raise AssertionError("no context found after which the tiny model writes a word")


def test_cloze_accuracy_is_greedy_prediction_of_every_target_token(tmp_path, monkeypatch) -> None:
    """lp_offline_cloze through lm-eval: right only where the model's greedy continuation is every
    token of " target" (the space is part of the target), as computed here by hand."""
    from layerprune.evaluation.harness import write_task_files

    loaded = tiny_loaded(num_layers=2)
    context, word = _context_followed_by_a_word(loaded)
    other = "z" if word[0] != "z" else "y"
    rows = [{"context": context, "target": word}, {"context": context, "target": other + word[1:]},
            {"context": context, "target": word[:1]}]
    root = tmp_path / "tasks"
    write_task_files("lp_offline_cloze", rows, root)
    monkeypatch.chdir(tmp_path)
    run = run_tasks(loaded.model, loaded.tokenizer, ["lp_offline_cloze"], include_path=root)
    assert run.correct["lp_offline_cloze"] == [1, 0, 1]
    assert run.metrics["lp_offline_cloze"]["acc"] == pytest.approx(2 / 3)
    assert run.predictions["lp_offline_cloze"] == []  # no choices: stability does not apply


def test_a_task_written_after_an_earlier_run_in_the_same_process_is_found(tmp_path, monkeypatch) -> None:
    """lm-eval indexes a task folder once, when its manager is built: a run after another task was
    built into the same folder (a cold cache, as on CI) must see it, not a stale index."""
    from layerprune.evaluation.harness import write_task_files

    loaded = tiny_loaded(num_layers=2)
    root = tmp_path / "tasks"
    write_task_files("lp_offline_cloze", [{"context": "ab", "target": "c"}], root)
    monkeypatch.chdir(tmp_path)
    first = run_tasks(loaded.model, loaded.tokenizer, ["lp_offline_cloze"], include_path=root)
    write_offline_task(OFFLINE_TASKS[TASK], letters_task(12, seed=3), root)
    second = run_tasks(loaded.model, loaded.tokenizer, [TASK], include_path=root)
    assert len(first.correct["lp_offline_cloze"]) == 1 and len(second.predictions[TASK]) == 12



@pytest.mark.parametrize("num_fewshot", [None, 2])
def test_few_shot_prompts_are_lm_evals_own(task_root, num_fewshot) -> None:
    """run_tasks calls lm-eval's core ``evaluate`` and sets few-shot up itself (count, sampler seed):
    the model must see exactly the sequences lm-eval's own entry point, ``simple_evaluate`` with
    plain ``HFLM``, feeds it (one request per forward pass, so no padding differs)."""
    loaded = tiny_loaded(num_layers=2)
    seen: list[tuple[int, ...]] = []
    hook = loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple((args[0] if args else kwargs["input_ids"])[0].tolist())),
        with_kwargs=True)
    run_tasks(loaded.model, loaded.tokenizer, [TASK], batch_size=1, num_fewshot=num_fewshot, include_path=task_root)
    ours, seen[:] = sorted(seen), []
    simple_evaluate(model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1), tasks=[TASK],
                    task_manager=TaskManager(include_path=str(task_root), include_defaults=False),
                    num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0)
    hook.remove()
    assert len(ours) == 24 and ours == sorted(seen)
