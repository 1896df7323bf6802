"""``eval.json``: the typed, versioned record of an evaluation (:func:`layerprune.evaluate`'s result).

What :func:`~layerprune.evaluate` returns and ``write_report`` writes is checked against
:class:`EvalReport`, so the file always has the same shape and a ``format_version``, and its JSON
Schema ships in the package (``layerprune/schemas/``, written by ``docs/gen_api.py``) for readers
that do not import layerprune. The result stays a plain mapping (the JSON as written) for the
tables, plots and benchmarks that read it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from layerprune.evaluation.classification import ClassificationSettings
from layerprune.evaluation.config import EvalConfig
from layerprune.records import known_record

FORMAT_VERSION = 1

Interval = list[float]  # [low, high] of a 95% interval
PerTask = dict[str, list[int]]


class _Record(BaseModel):
    """A part of the record: typed where layerprune relies on the key, open to keys it adds later."""

    model_config = ConfigDict(extra="allow")


class PerplexityEntry(_Record):
    """One data set's perplexity by the non-overlapping-window protocol (``evaluation.perplexity``)."""

    nll: float = Field(description="mean negative log-likelihood, nats per predicted token")
    ppl: float
    tokens: int = Field(ge=1, description="predicted tokens")
    ci95: Interval = Field(min_length=2, max_length=2, description="bootstrap interval over windows")


class RetainedEntry(_Record):
    """Retained performance against the reference (``evaluation.intervals.retained_performance``)."""

    mean: float
    ci95: Interval = Field(min_length=2, max_length=2)
    tasks: dict[str, float] = Field(description="accuracy / the reference's accuracy, per task")
    excluded: list[str] = Field(default=[], description="tasks the reference got all wrong (no ratio)")


class AboveChanceEntry(_Record):
    """Retained performance above chance (``evaluation.intervals.retained_above_chance``)."""

    mean: float | None = Field(description="mean over informative tasks of (acc - chance) / (reference - chance); "
                                           "none when no task is informative")
    ci95: Interval | None = Field(min_length=2, max_length=2, description="paired bootstrap over examples")
    tasks: dict[str, float] = Field(description="(acc - chance) / (reference acc - chance), per informative task")
    uninformative: list[str] = Field(description="tasks whose reference is within its own 95% interval of chance: "
                                                 "left out")


class FidelityEntry(_Record):
    """Closeness to the original on one data set's perplexity windows (``evaluation.fidelity``)."""

    kl: float = Field(ge=0, description="mean KL(original || model) of next-token distributions, nats per token")
    kl_ci95: Interval = Field(min_length=2, max_length=2, description="bootstrap interval over windows")
    top1_agreement: float = Field(ge=0, le=1, description="share of tokens where both models' top-1 token agree")
    top1_agreement_ci95: Interval = Field(min_length=2, max_length=2, description="bootstrap interval over windows")
    tokens: int = Field(ge=1, description="predicted tokens compared (as perplexity's)")


class GenerationEntry(_Record):
    """Greedy continuations of held-out prompts against the original's (``evaluation.generation``)."""

    prompts: int = Field(ge=1)
    mean_agreed_tokens: float = Field(ge=0, description="mean tokens before the first divergence")
    identical: float = Field(ge=0, le=1, description="share of continuations equal to the original's")
    max_new_tokens: int = Field(ge=1)
    examples: list[dict[str, Any]] = Field(description="prompt, original, model (texts) and agreed_tokens")


class EfficiencyEntry(_Record):
    """Size, speed and FLOPs of one model (``evaluation.efficiency.measure_efficiency``)."""

    parameters: int = Field(ge=0)
    prefill_flops_per_token: float
    decode_flops_per_token: float
    kv_cache_context: int | None = Field(default=None, ge=1, description="tokens in the cache where the KV cache "
                                         "per token is read: the middle of the decode")
    kv_cache_bytes_per_token: int | None = Field(default=None, ge=0, description="bytes of keys and values one row "
                                                 "caches per token at kv_cache_context (a removed attention caches "
                                                 "none; a sliding window caps its layer)")
    kv_cache_ratio: float | None = Field(default=None, ge=0, description="kv_cache_bytes_per_token over the "
                                         "reference's; null when the reference caches nothing")
    disk_bytes: int | None = Field(default=None, ge=0)
    peak_memory_bytes: int | None = None
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_speedup: float
    decode_speedup: float
    prefill_ideal_speedup: float
    decode_ideal_speedup: float


class ClassificationCurve(_Record):
    """Accuracy against the number of kept layers (``evaluation.classification``)."""

    accuracy: dict[str, dict[str, float]] = Field(description="head kind -> k -> test accuracy")
    seconds: dict[str, dict[str, float]]
    chance: float = Field(description="the majority class's share of the test set")
    num_layers: int = Field(ge=1)
    verbalizer: list[str]
    train_examples: int = Field(ge=0)
    test_examples: int = Field(ge=0)
    settings: ClassificationSettings
    dataset: str


class ModelResult(_Record):
    """Everything measured on one model; a measurement not asked for is absent."""

    num_layers: int = Field(ge=1)
    parameters: int = Field(ge=0)
    removed_layers: list[int] = Field(description="original indices of the layers the model lacks")
    perplexity: dict[str, PerplexityEntry] | None = Field(default=None, description="per data set")
    tasks: dict[str, dict[str, float]] | None = Field(
        default=None, description="lm-eval metrics per task (acc, acc_norm, stderr, available, evaluated, ...)")
    predictions: PerTask | None = Field(default=None, description="chosen answer per document, per task")
    correct: PerTask | None = Field(default=None, description="1 where the answer was right, per document, per task")
    stability: dict[str, float] | None = Field(default=None, description="agreement with the reference's answers")
    retained: RetainedEntry | None = None
    retained_above_chance: AboveChanceEntry | None = None
    fidelity: dict[str, FidelityEntry] | None = Field(default=None, description="per data set, against the original")
    generation: GenerationEntry | None = None
    efficiency: EfficiencyEntry | None = None
    classification: ClassificationCurve | None = None
    seconds: float = Field(ge=0, description="time spent measuring this model (efficiency aside)")


@known_record
class EvalReport(BaseModel):
    """What ``eval.json`` holds: the reference model's name, every model's results (the reference
    first), and the evaluation's options."""

    model_config = ConfigDict(extra="forbid", title="eval.json")

    format_version: int = Field(default=FORMAT_VERSION, ge=1, le=FORMAT_VERSION)
    reference: str = Field(description="the model every other one is compared with")
    models: dict[str, ModelResult]
    settings: EvalConfig


def checked_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` checked against :class:`EvalReport` and returned as it is (a mapping that does not
    fit is a bug in its writer, so it raises); its ``format_version`` is set if it has none."""
    report = {"format_version": FORMAT_VERSION, **report}
    EvalReport.model_validate(report)
    return report
