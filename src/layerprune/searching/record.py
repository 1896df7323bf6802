"""``search.json``: the typed, versioned record of a search (:class:`SearchDocument`).

Every candidate tried with its held-out perplexity and speed-ups, the winner, what was skipped or
left untried and why, and how the work was done (budget, calibration, ranking, the options as a
:class:`~layerprune.searching.config.SearchConfig`). :meth:`SearchRecord.to_json` checks it
against the model, so the file always has this shape; its JSON Schema ships beside
``layerprune.json``'s (see :mod:`layerprune.records`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from layerprune.records import known_record
from layerprune.searching.config import SearchConfig

FORMAT_VERSION = 4
"""2: a decode speed-up timed in turns (``measured_decode_speedup`` null where its interval stayed wide), and
what the time budget left out (``budget_left_out``, ``shortfall``), the original's perplexity (``ranking.original_ppl``).
3: the ``algorithm`` and, for an evolutionary search, its ``evolution`` part (fitness, trace); a file of version 1
or 2 reads as a heuristic search.
4: sub-layer candidates: each candidate's ``granularity`` and the branches it removes (``removed_attention``,
``removed_mlp``), ``branch_importance`` and ``budget.branch_parameters``; an older file reads as whole layers."""


class _Part(BaseModel):
    """A part of the record: typed where readers rely on the key, open to keys added later."""

    model_config = ConfigDict(extra="allow")


class CandidateEntry(_Part):
    """One cut: the layers it removes (as loaded), and in a sub-layer cut the layers whose attention or
    MLP alone goes; which metric and strategy found it, choosing among layers or branches (and which
    others found the same cut), and the training-free repair applied (``null``: plain removal)."""

    removed_layers: list[int] = Field(description="layers removed whole (indices as loaded)")
    removed_attention: list[int] = Field(default_factory=list, description="layers whose attention alone is "
                                         "removed (their MLP stays)")
    removed_mlp: list[int] = Field(default_factory=list, description="layers whose MLP alone is removed (their "
                                   "attention stays)")
    granularity: str = Field(default="layer", description="what its finder chose among: layer (whole layers) or "
                             "sublayer (attention and MLP branches)")
    metric: str
    strategy: str
    repair: str | None
    also_found_by: list[str]
    fitness: float | None = Field(default=None, description="an evolutionary search's fitness of the cut (lower is "
                                  "better)")


class TriedEntry(CandidateEntry):
    """A ranked candidate."""

    held_out_ppl: float = Field(description="perplexity on the held-out windows; a lower bound when dropped early")
    held_out_tokens: int = Field(ge=0)
    held_out_windows: int = Field(ge=0)
    dropped_early: bool
    parameters: int = Field(ge=0)
    flop_ideal_decode_speedup: float
    measured_decode_speedup: float | None = Field(
        description="decode speed-up timed in turns against the original; null when its 95% interval never came "
                    "within 10% (a loaded machine): read the FLOP-ideal figure and decode_speedup_note")
    measured_decode_speedup_ci95: tuple[float, float] | None = None
    decode_speedup_turns: int | None = Field(default=None, ge=0, description="turns timed; 0: not timed, the time "
                                             "budget left no room (the FLOP-ideal figure decides)")
    decode_speedup_note: str | None = None
    seconds: float = Field(ge=0)


class UnrankedEntry(CandidateEntry):
    """A candidate not ranked: a repair that refused the cut or its data, one the budget left out, or a
    sub-layer cut whose decode speed-up fell short of the target speed-up (then with its speed-up fields)."""

    reason: str


class Budget(_Part):
    remove: int | str | None = Field(description="the layers asked for (a count or a share); null when a target "
                                                 "speed-up decided the count")
    target_speedup: float | None
    measured_decode_speedup_at_count: float | None
    time_budget_minutes: float | None
    max_candidates: int | None
    branch_parameters: int | None = Field(default=None, description="sub-layer candidates: the decoder parameters "
                                          "each removes (a heuristic selection within half a branch of it)")


class Ranking(_Part):
    source: str
    split: str
    seq_len: int = Field(ge=1)
    windows: int = Field(ge=1)
    tokens: int = Field(ge=0, description="held-out tokens the winner was ranked on")
    original_ppl: float | None = Field(default=None, description="the uncut model's perplexity on the same windows "
                                       "(format 2 on)")
    held_out: str
    drop_rule: str


class SpeedWorkload(_Part):
    prompt_len: int = Field(ge=1)
    new_tokens: int = Field(ge=1)
    repeats: int = Field(ge=1)


class GenerationEntry(_Part):
    """One generation of an evolutionary search (index 0: the initial population)."""

    index: int = Field(ge=0)
    best_fitness: float = Field(ge=0, description="the parent's fitness after this generation (lower is better)")
    improved: bool
    contenders: int = Field(ge=0)
    evaluations: int = Field(ge=0, description="batch evaluations run (a contender on one fitness batch)")
    cache_hits: int = Field(ge=0, description="contenders already scored as far as this generation needed")
    stopped_early: int = Field(ge=0, description="contenders stopped once they could not survive their stage")
    tokens: int = Field(ge=0, description="tokens forwarded (each batch's tokens once per contender scored on it)")
    layer_tokens: int = Field(ge=0, description="layer evaluations of one token run")
    prefix_free_layer_tokens: int = Field(ge=0, description="the same evaluations with every kept layer run (no "
                                          "cached prefix)")
    naive_layer_tokens: int = Field(ge=0, description="every contender on every batch with full forwards")
    seconds: float = Field(ge=0)


class EvolutionPart(_Part):
    """How an evolutionary search ran: its fitness, its settings and each generation's trace."""

    fitness: str
    fitness_rows: int = Field(ge=1)
    fitness_positions: int = Field(ge=1, description="scored next-token positions in the fitness rows")
    fitness_batches: int = Field(ge=1)
    stage_one_batches: int = Field(ge=1, description="batches every child is scored on before the survivors")
    survivors: int = Field(ge=1)
    top_k: int | None = Field(description="kl: the original's log-probabilities kept per position (with the tail "
                                          "mass)")
    budget_parameters: int = Field(ge=0, description="parameters every cut removes (within the tolerance)")
    budget_tolerance: int = Field(ge=0)
    initial_population: int = Field(ge=1)
    heuristic_cuts: int = Field(ge=0, description="distinct heuristic selections in the initial population")
    best_heuristic_fitness: float | None = Field(description="the best heuristic selection's fitness, where it was "
                                                 "scored in full")
    generations_run: int = Field(ge=0)
    stopped_by: str = Field(description="why the evolution ended: its generations, or the time budget")
    units: str = Field(default="layers", description="what the evolution removes and swaps: layers or branches")
    trace: list[GenerationEntry]


@known_record
class SearchDocument(BaseModel):
    """What ``search.json`` holds."""

    model_config = ConfigDict(extra="forbid", title="search.json")

    format_version: int = Field(default=FORMAT_VERSION, ge=1, le=FORMAT_VERSION)
    model: str
    num_layers: int = Field(ge=1)
    remove: int = Field(ge=1, description="layers each candidate removes (a sub-layer candidate: about that many "
                        "layers' worth of parameters, budget.branch_parameters)")
    winner: int = Field(ge=0, description="the winner's index in candidates")
    winner_label: str
    budget: Budget
    calibration: dict[str, Any] = Field(description="the calibration the metrics scored on and the repairs fitted to")
    ranking: Ranking
    metrics: list[str]
    exhaustive: bool
    selections_not_made: dict[str, str] | None = Field(description="metric/strategy -> why it was not selected")
    importance: dict[str, list[float]] = Field(description="every metric's per-layer importance (empty for a "
                                               "sub-layer search)")
    branch_importance: dict[str, dict[str, float]] | None = Field(
        default=None, description="at sub-layer granularity: every branch metric's importance per branch (attn.N, "
                                  "mlp.N)")
    speed_workload: SpeedWorkload
    heal: str | None
    options: SearchConfig = Field(description="the search's options, defaults filled in")
    candidates: list[TriedEntry]
    skipped_repairs: list[UnrankedEntry]
    not_tried: list[UnrankedEntry]
    budget_left_out: dict[str, str] | None = Field(default=None, description="metrics the time budget left "
                                                   "unscored -> why")
    shortfall: str | None = Field(default=None, description="set when the time budget cut the search short: how "
                                  "many of the candidates it meant to rank were ranked")
    seconds: float = Field(ge=0)
    algorithm: str = Field(default="heuristic", description="heuristic: every metric x strategy cut ranked; "
                           "evolution: the best cuts by fitness of an evolutionary search ranked")
    evolution: EvolutionPart | None = Field(default=None, description="an evolutionary search's fitness, settings "
                                            "and trace")

    @model_validator(mode="before")
    @classmethod
    def _options_name_their_algorithm(cls, document: Any) -> Any:
        """A file of version 1 or 2 names no algorithm in its options: it was a heuristic search, and its
        options must not read as today's default (``evolution``)."""
        if isinstance(document, dict) and isinstance(document.get("options"), dict):
            if "algorithm" not in document["options"]:
                options = {**document["options"], "algorithm": document.get("algorithm", "heuristic")}
                return {**document, "options": options}
        return document
