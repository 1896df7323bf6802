"""Zero-shot benchmarks through lm-evaluation-harness, on the model already in memory.

The model is wrapped by lm-eval's ``HFLM`` (never re-loaded from disk), so a pruned model is
scored exactly as it is, and the numbers are the harness's, comparable with published ones; our
subclass of it (``scored_positions``) only skips the LM head where no answer is scored.

Offline tasks (``lp_*``) need no network: their YAML definitions ship in ``evaluation/tasks/``,
and at run time their data is built from the data layer's labelled sets and held-out corpora
(which fetch it out of PyPI wheels) into ``$LAYERPRUNE_CACHE/lm-eval-tasks/v<N>/``, next to a copy
of the YAML that points at the local JSONL file. lm-eval then finds them through
``TaskManager(include_path=...)``. ``lp_offline`` names the four-task suite of ``data.eval_suite``;
``paper`` names the papers' benchmarks, which lm-eval downloads from the Hugging Face hub.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerprune import data, hub
from layerprune.cache import cache_dir
from layerprune.data import eval_suite
from layerprune.errors import OptionError, UsageError
from layerprune.evaluation.intervals import stderr_of_mean
from layerprune.outputs import write_bytes_atomic

log = logging.getLogger(__name__)

ONLINE_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "mmlu")


class Labelled(Protocol):
    """What the data layer's ``load_labelled`` returns (``LabelledDataset``)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]


@dataclass(frozen=True)
class OfflineTask:
    """An lm-eval task whose data comes from one of the data layer's labelled sets."""

    name: str
    dataset: str
    split: str = "test"
    max_chars: int = 1000  # long posts are cut: the label is clear early and scoring stays fast
    verbalizer: dict[str, str] = field(default_factory=dict)  # label name -> answer word, if it differs

    def choices(self, label_names: Sequence[str]) -> list[str]:
        return [self.verbalizer.get(name, name) for name in label_names]

    def rows_of(self, data: Labelled) -> list[dict]:
        """The task's JSONL rows: whitespace-normalized text cut to ``max_chars``, label and choices."""
        if len(data.texts) != len(data.labels) or not data.texts:
            raise UsageError(f"labelled data for {self.name} is empty or has {len(data.texts)} texts for "
                             f"{len(data.labels)} labels; check the data set {self.dataset!r}")
        choices = self.choices(data.label_names)
        return [{"text": " ".join(text.split())[:self.max_chars], "label": int(label), "choices": choices}
                for text, label in zip(data.texts, data.labels)]

    def rows(self) -> list[dict]:
        return self.rows_of(data.load_labelled(self.dataset, self.split))


@dataclass(frozen=True)
class SuiteTask:
    """A task of the ``lp_offline`` suite: rows built by ``data.eval_suite`` from a test split."""

    name: str
    builder: str  # the name of the ``data.eval_suite`` function that makes the rows
    source: str  # a built-in corpus (``load_texts``) or a labelled set (``load_labelled``)

    def rows(self) -> list[dict]:
        build = getattr(eval_suite, self.builder)
        if self.source not in data.BUILTIN_CORPORA:  # labelled sets drop test texts also in train themselves
            return build(data.load_labelled(self.source, "test"))
        seen = {shingle for split in ("train", "validation") for document in data.load_texts(self.source, split)
                for shingle in eval_suite.shingles(document)}
        return build(data.load_texts(self.source, "test"), seen)


SUITE_TASKS = (
    SuiteTask("lp_offline_next_sentence", "next_sentence_rows", "news-sample"),
    SuiteTask("lp_offline_cloze", "cloze_rows", "wiki-sample"),
    SuiteTask("lp_offline_sentiment", "sentiment_rows", "rotten-tomatoes"),
    SuiteTask("lp_offline_topic", "topic_rows", "reuters-r8"),
)
OFFLINE_TASKS: dict[str, OfflineTask | SuiteTask] = {
    task.name: task
    for task in (
        OfflineTask("lp_sentiment_rt", "rotten-tomatoes"),
        OfflineTask("lp_topic_r8", "reuters-r8"),
        OfflineTask("lp_topic_20ng", "20newsgroups"),
        *SUITE_TASKS,
    )
}
# Names that stand for several tasks: the offline suite, and the papers' benchmarks (online).
TASK_GROUPS: dict[str, tuple[str, ...]] = {"lp_offline": tuple(task.name for task in SUITE_TASKS),
                                           "paper": ONLINE_TASKS}


def expand_task_names(tasks: Sequence[str]) -> list[str]:
    """``tasks`` with every group name replaced by its tasks, each task once, in order."""
    return list(dict.fromkeys(name for group in tasks for name in TASK_GROUPS.get(group, (group,))))


def check_hub_reachable(tasks: Sequence[str]) -> None:
    """Fail at once if lm-eval would need the Hugging Face hub for ``tasks`` and cannot reach it.

    lm-eval's own tasks download their data from the hub; unreachable, ``datasets`` retries for
    most of a minute and ends in a traceback. With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` the
    user's local Hugging Face cache must hold the data, so an empty cache is refused; otherwise a
    2-second connect to the hub decides.
    """
    online = [name for name in tasks if name not in OFFLINE_TASKS]
    if not online:
        return
    fix = f"offline, use the tasks lp_offline ({', '.join(TASK_GROUPS['lp_offline'])})"
    if hub.offline_requested():
        if not _hugging_face_cache_has_datasets():
            raise UsageError(f"task(s) {', '.join(online)} need data from the Hugging Face hub, but HF_HUB_OFFLINE or "
                             f"HF_DATASETS_OFFLINE is set and the Hugging Face cache holds no datasets; {fix}")
    elif not hub.hub_reachable(timeout=2.0):
        raise UsageError(f"task(s) {', '.join(online)} need data from the Hugging Face hub, which cannot be reached; "
                         f"{fix}")


def _hugging_face_cache_has_datasets() -> bool:
    """Whether the hub cache or the ``datasets`` cache holds any data set (their default places
    follow ``HF_HOME``; ``HF_HUB_CACHE`` and ``HF_DATASETS_CACHE`` override them)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub").expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
    return any(hub.glob("datasets--*")) or (datasets_cache.is_dir() and any(
        entry.is_dir() for entry in datasets_cache.iterdir()))


def check_task_names(tasks: Sequence[str]) -> None:
    """Fail before loading any model if a task name is unknown to both us and lm-eval, or needs a
    hub that cannot be reached.

    ``lp_`` names are ours and checked at once; other names need lm-eval's task index, which is
    built once per process (it takes a while) and reused for the run itself.
    """
    tasks = expand_task_names(tasks)
    ours = [name for name in tasks if name.startswith("lp_") and name not in OFFLINE_TASKS]
    if ours:
        raise UsageError(f"unknown offline task(s) {', '.join(ours)}; the offline tasks are {', '.join(OFFLINE_TASKS)} "
                         "and the suite lp_offline")
    check_hub_reachable(tasks)
    unknown = [name for name in tasks if name not in OFFLINE_TASKS]
    if not unknown:
        return
    known = set(task_manager(None, include_defaults=True).all_tasks)
    missing = [name for name in unknown if name not in known]
    if missing:
        raise UsageError(
            f"unknown lm-eval task(s) {', '.join(missing)}; use offline tasks {', '.join(OFFLINE_TASKS)} or lm-eval "
            f"tasks such as {', '.join(ONLINE_TASKS)} (`lm-eval ls tasks` lists all)"
        )


def task_manager(include_path: Path | None, include_defaults: bool) -> Any:
    """lm-eval's task index of ``include_path`` (and of its own tasks with ``include_defaults``).

    lm-eval reads the folder once, when the manager is built, so the cached manager is keyed on the
    task files the folder holds now: one built before a task was written there would not know it.
    """
    if include_path is None:
        return _cached_task_manager(None, include_defaults, frozenset())
    root = Path(include_path)
    files = frozenset(str(path.relative_to(root)) for path in root.rglob("*.yaml"))
    return _cached_task_manager(str(root), include_defaults, files)


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include_path: str | None, include_defaults: bool, task_files: frozenset[str]) -> Any:
    """Built once per key: indexing lm-eval's thousands of YAML files is slow."""
    from lm_eval.tasks import TaskManager  # deferred: lm-eval is the optional eval extra (~0.7 s to import)

    return TaskManager(verbosity="ERROR", include_path=include_path, include_defaults=include_defaults)


TASKS_VERSION = 3  # part of the cache path: raise it when a builder or a task YAML changes, so tasks are rebuilt


def tasks_root() -> Path:
    """Where offline tasks are built: in the cache, once per ``TASKS_VERSION``."""
    return cache_dir() / "lm-eval-tasks" / f"v{TASKS_VERSION}"


def write_task_files(name: str, rows: Sequence[dict], root: Path) -> Path:
    """Write task ``name``'s JSONL ``rows`` and its YAML (pointing at them) under ``root``; returns
    the task's folder. The rows are written in the form ``rows_digest`` hashes."""
    folder = root / name
    text = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
    template = yaml.safe_load(resources.files("layerprune.evaluation").joinpath(f"tasks/{name}.yaml").read_text())
    data_file = write_bytes_atomic(folder / f"{template['test_split']}.jsonl", text.encode())
    template["dataset_kwargs"] = {"data_files": {template["test_split"]: str(data_file)}}
    write_bytes_atomic(folder / f"{name}.yaml", yaml.safe_dump(template, sort_keys=False).encode())
    return folder


def write_offline_task(task: OfflineTask, data: Labelled, root: Path) -> Path:
    """Write ``task``'s YAML and JSONL data under ``root``; returns the task's folder."""
    return write_task_files(task.name, task.rows_of(data), root)


def prepare_offline_tasks(names: Sequence[str], root: Path | None = None) -> Path:
    """Build the data and YAML of the named offline tasks in the cache (once); returns the include path."""
    root = root or tasks_root()
    for name in names:
        if not (root / name / f"{name}.yaml").is_file():
            write_task_files(name, OFFLINE_TASKS[name].rows(), root)
    return root


@dataclass
class TaskRun:
    """lm-eval's metrics per task (with ``stderr``, ``available``, ``evaluated`` and ``chance`` added), the
    model's answer (choice index) per document, and whether it was right (0/1) per document of
    every task asked for (a group's documents are its subtasks' in order), for paired bootstraps."""

    metrics: dict[str, dict[str, float]]
    predictions: dict[str, list[int]]
    correct: dict[str, list[int]] = field(default_factory=dict)


def run_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], *,
              batch_size: int = 8, limit: int | float | None = None, num_fewshot: int | None = None,
              include_path: Path | None = None) -> TaskRun:
    """Score the in-memory ``model`` on ``tasks`` (group names expanded) with lm-eval; offline tasks
    are prepared first.

    Offline-only runs skip lm-eval's built-in task index and read their data from local JSONL, so
    nothing is fetched and nothing waits on a network. They leave ``HF_HUB_OFFLINE`` alone: the
    Hugging Face libraries read it once, at import, so setting it here would only mislead later
    code in the process (a hub download would believe the user asked for offline mode).

    The tasks run through lm-eval's core ``evaluate`` rather than ``simple_evaluate``, which adds
    to every result a ``git describe`` of the working directory (printing "fatal: not a git
    repository" outside one) and torch's environment survey (~8 s of subprocesses per call on a
    small CPU), and reseeds the process's global random generators; our results record versions
    themselves, and nothing here draws from those generators.
    """
    from lm_eval.evaluator import evaluate  # deferred: lm-eval is the optional eval extra (~0.7 s to import)

    from layerprune.evaluation.scored_positions import ScoredPositionsLM  # deferred: it subclasses lm-eval's HFLM

    check_task_names(tasks)
    tasks = expand_task_names(tasks)
    offline = [name for name in tasks if name in OFFLINE_TASKS]
    if offline and include_path is None:
        include_path = prepare_offline_tasks(offline)
    only_offline = len(offline) == len(tasks)
    manager = task_manager(include_path, not only_offline)
    # lm-eval's HFLM warns that an in-memory model is "not of type str": that is how we mean to use it
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    lm = ScoredPositionsLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    loaded = manager.load(list(tasks))
    for name, task in loaded["tasks"].items():
        _set_fewshot(task, num_fewshot)
        check_fewshot_pool(str(name), task)
    output = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=0)
    if output is None:  # only on non-zero ranks of a distributed run
        return TaskRun({}, {})
    samples = output.get("samples", {})
    metrics = {task: _numeric(values) for task, values in output["results"].items()}
    predictions = {task: predictions_from_samples(task_samples) for task, task_samples in samples.items()}
    subtasks = output.get("group_subtasks", {})
    correct = {}
    for name in dict.fromkeys([*tasks, *samples]):
        leaves = _leaf_tasks(name, subtasks)
        documents = [sorted(samples.get(leaf, []), key=lambda sample: int(sample["doc_id"])) for leaf in leaves]
        scored = [sample for leaf_samples in documents for sample in leaf_samples if "acc" in sample]
        right = [int(sample["acc"] > 0) for sample in scored]
        counts = [output.get("n-samples", {}).get(leaf, {}) for leaf in leaves]
        if name in metrics and right:
            metrics[name].update(stderr=stderr_of_mean(right), available=sum(c.get("original", 0) for c in counts),
                                 evaluated=len(right), chance=chance_rate(scored))
            if name in tasks:
                correct[name] = right
    return TaskRun(metrics, predictions, correct)


def chance_rate(samples: Sequence[dict[str, Any]]) -> float:
    """The accuracy of a uniform guess over the scored documents: the mean of 1 / (number of choices).
    A document scored by one loglikelihood (a cloze, right when greedy decoding gives the answer
    exactly) has no choices to guess among: its chance is 0 (a guess from the vocabulary)."""
    counts = [len(sample.get("filtered_resps") or []) for sample in samples]
    return float(sum(1 / count for count in counts if count >= 2) / len(counts)) if counts else 0.0


def _leaf_tasks(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    """The tasks (not groups) under ``name`` in lm-eval's ``group_subtasks``, depth first."""
    children = subtasks.get(name)
    return [leaf for child in children for leaf in _leaf_tasks(child, subtasks)] if children else [name]


FEWSHOT_SEED = 1234
"""The seed of each task's few-shot sampler: lm-eval's default (``simple_evaluate``'s), so few-shot
prompts are those of a plain lm-eval run."""


def check_fewshot_pool(name: str, task: Any) -> None:
    """Refuse more few-shot examples than ``task`` has to draw from, before any model runs (lm-eval would
    stop at its first request with a sampling error). One is held back: where the examples come from
    the evaluated split, the document itself is drawn and left out."""
    shots = task.get_config("num_fewshot") or 0
    pool = task.fewshot_docs() if shots else None
    if pool is not None and shots > len(pool) - 1:
        raise OptionError.about("num_fewshot", f"{shots} is more than task {name} can draw from ({len(pool)} "
                                               f"examples, one held back); use at most {max(len(pool) - 1, 0)}")


def _set_fewshot(task: Any, num_fewshot: int | None) -> None:
    """Set up ``task``'s few-shot examples as ``simple_evaluate`` does: ``num_fewshot`` unless the
    task's YAML fixes it at 0, else the task's own count (0 when it names none); lm-eval's seed."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif num_fewshot is None and task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval keys look like ``acc,none``; keep the numbers under plain names."""
    out: dict[str, float] = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and filter_name in ("none", ""):
            out[metric] = float(value)
    return out


def predictions_from_samples(samples: list[dict[str, Any]]) -> list[int]:
    """The chosen answer per document (ordered by ``doc_id``) of a multiple-choice task.

    lm-eval logs, per document, one ``(loglikelihood, is_greedy)`` per choice; the prediction is the
    choice with the highest log-likelihood, as for its ``acc`` metric. Other task kinds (a single
    loglikelihood per document, generated text) have no choices to agree on and give an empty list.
    """
    predictions: dict[int, int] = {}
    for sample in samples:
        responses = sample.get("filtered_resps") or []
        scores = [r[0] if isinstance(r, (list, tuple)) else r for r in responses]
        if len(scores) < 2 or not all(isinstance(s, (int, float)) for s in scores):
            return []  # a cloze (one loglikelihood per document) or a generation has no choice to agree on
        predictions[int(sample["doc_id"])] = max(range(len(scores)), key=lambda i: scores[i])
    return [predictions[i] for i in sorted(predictions)]
