"""``scores.json``: the record ``layerprune score`` (and a recipe's score stage) writes.

Typed so that an existing results file is recognised as layerprune's own by its content (see
:func:`layerprune.records.known_record`) and so readers know its shape: the keys every scores file
has are required, the rest (details, selection, additions of later versions) are open.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from layerprune.records import known_record


@known_record
class ScoresDocument(BaseModel):
    """What ``scores.json`` holds: every metric's raw values and importance per layer of the model as
    scored, what the values mean, the data they came from, and the selection when one was made."""

    model_config = ConfigDict(extra="allow", title="scores.json")

    model: str
    num_layers: int = Field(ge=1)
    tokens: int = Field(ge=0)
    metrics: dict[str, Any]
    importance: dict[str, list[float | None]]
    meaning: dict[str, str]
    convention: str
    original_layer_ids: list[int]
    data: dict[str, Any]
