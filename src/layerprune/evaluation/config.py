"""What an evaluation measures: :class:`EvalConfig`, the one declaration of every evaluation option.

:func:`layerprune.evaluate` takes it (or builds it from its keywords), a recipe's ``eval`` section is
read as its keys, ``layerprune eval``'s flags are generated from it, and ``eval.json`` records it as
its ``settings``; so a default is written once and a bad value is refused alike everywhere. The
efficiency workload and the classification curve are options of their own (:class:`Workload`,
:class:`ClassificationSettings`), nested under ``efficiency`` and ``classification``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import field_validator

from layerprune.data import check_source
from layerprune.errors import OptionError, UsageError
from layerprune.evaluation.classification import ClassificationSettings
from layerprune.evaluation.efficiency import Workload
from layerprune.evaluation.harness import OFFLINE_TASKS, ONLINE_TASKS, check_task_names
from layerprune.evaluation.perplexity import PPL_SOURCES, resolve_ppl_source
from layerprune.options import NO_FLAG, Config, Parse, comma_list, declaration, option, within


class EvalConfig(Config):
    """Everything one evaluation measures, and how. Built, it has passed every check that needs no
    file, hub or model; :meth:`check_inputs` checks the data and task names before a model loads."""

    unit = "eval"

    ppl: Annotated[tuple[str, ...], Parse(comma_list)] = option(
        (), f"perplexity data sets: {', '.join(PPL_SOURCES)} or text files", metavar="DATA,...")
    seq_len: int = option(512, "perplexity window length in tokens, twice the 256 of scoring and healing rows: a "
                          "perplexity is comparable only at the window the reported results used", minimum=2)
    max_windows: int | None = option(None, "score only the first N windows (quick looks); none: all", minimum=1)
    fidelity: Annotated[tuple[str, ...], Parse(comma_list)] = option(
        (), "KL(original || model) and top-1 agreement of next-token distributions on these data sets (as ppl's, on "
            "its windows and tokens)", metavar="DATA,...")
    reference: str | None = option(
        None, "the original model fidelity and generation compare with (default: the source_model in the models' "
              "layerprune.json, else the first model when models are compared)", metavar="MODEL")
    generation: int | None = option(None, "greedy continuations of N held-out prompts by the original and each model: "
                                    "tokens before the first divergence, share identical", minimum=1, metavar="N")
    generation_tokens: int = option(32, "tokens each generation continuation has at most", minimum=1)
    generation_prompts: str = option("wiki-sample", "where generation's prompts come from (its test split): a data "
                                     "set or a text file", metavar="DATA")
    prompt_tokens: int = option(32, "text tokens of each generation prompt (in the chat template's user turn for "
                                "a tokenizer with one)", minimum=1)
    tasks: Annotated[tuple[str, ...], Parse(comma_list)] = option(
        (), f"lm-eval tasks: lp_offline (the offline suite) or offline tasks {', '.join(OFFLINE_TASKS)}; online: "
            f"paper ({', '.join(ONLINE_TASKS)}) or any lm-eval task", metavar="TASK,...")
    limit: int | None = option(None, "documents per task (none: all)", minimum=1)
    num_fewshot: int | None = option(None, "few-shot examples (none: the task's own)", minimum=0)
    batch_size: int = option(4, "sequences per forward pass", minimum=1)
    efficiency: Workload | bool | None = option(
        None, "measure size, throughput, memory and FLOPs: true for the default workload, or its options")
    classify: str | None = option(None, "labelled data set of the classification curve, e.g. rotten-tomatoes, "
                                  "reuters-r8 (sst2, ag_news online)")
    classification: ClassificationSettings | None = option(
        None, "the classification curve's options (at least ks) when classify is given", flag=NO_FLAG)

    @field_validator("efficiency", mode="before")
    @classmethod
    def _default_workload(cls, value: Any) -> Any:
        """``efficiency: true`` is the default workload, ``false`` none: kept as a :class:`Workload` or ``None``."""
        if isinstance(value, bool):
            return Workload() if value else None
        return value

    def check(self) -> None:
        if not (self.ppl or self.fidelity or self.generation or self.tasks or self.efficiency or self.classify):
            raise UsageError("nothing to evaluate; ask for ppl, fidelity, generation, tasks, efficiency and/or "
                             "classify")
        if self.classify and not (self.classification and self.classification.ks):
            ks = declaration(ClassificationSettings, "ks")
            raise OptionError(f"classification.{ks.name}", ks.flag,
                              "must list the layer counts to keep when classify is given, e.g. 1,2,4,8")

    def check_inputs(self) -> None:
        """Refuse perplexity data that does not exist and unknown task names (lm-eval's task index is
        read, and the hub asked when an online task needs it): before any model is loaded."""
        for name in (*self.ppl, *self.fidelity):
            resolve_ppl_source(name)
        if self.generation:
            check_source(self.generation_prompts, "test")
        if self.tasks:
            check_task_names(self.tasks)

    def check_depths(self, num_layers: int | None) -> None:
        """Refuse classification depths beyond ``num_layers``, the fewest layers of the models
        evaluated (``None``: not known yet)."""
        if self.classify and self.classification:
            with within("classification"):
                self.classification.check_depths(num_layers)

    @property
    def workload(self) -> Workload | None:
        """The efficiency workload (``efficiency`` as built: never a bare ``True``)."""
        return self.efficiency if isinstance(self.efficiency, Workload) else None
