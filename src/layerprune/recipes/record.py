"""``run.json``: the typed, versioned record of a recipe run (:class:`RunDocument`).

It names the recipe the run folder was started with (by fingerprint) and each finished stage,
which a resumed run skips. Every save is checked against the model; a ``run.json`` from before
``format_version`` reads as version 1 (its shape was the same), so such a run still resumes. Its
JSON Schema ships beside the other records' (see :mod:`layerprune.records`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from layerprune.records import known_record

FORMAT_VERSION = 1


class FinishedStage(BaseModel):
    """A finished stage: how long it took, and what the later stages read from it (the layers it
    removed, the model it saved, the search's winner...)."""

    model_config = ConfigDict(extra="allow")

    seconds: float = Field(ge=0)


@known_record
class RunDocument(BaseModel):
    """What ``run.json`` holds."""

    model_config = ConfigDict(extra="forbid", title="run.json")

    format_version: int = Field(default=FORMAT_VERSION, ge=1, le=FORMAT_VERSION)
    recipe_fingerprint: str = Field(description="of the recipe text and the model it runs on")
    stages: dict[str, FinishedStage] = Field(description="every finished stage, in the order they ran")
