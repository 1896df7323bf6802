"""Instruction data in the Alpaca format, for healing with loss on the response only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from layerprune.errors import UsageError

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass(frozen=True)
class InstructionExample:
    """The formatted prompt (no loss on it) and the response (the training target)."""

    prompt: str
    response: str


def load_instructions(path: str | Path) -> list[InstructionExample]:
    """Read Alpaca JSON (a list) or JSONL records with ``instruction``, optional ``input``, ``output``."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except FileNotFoundError:
        raise UsageError(f"instruction file {file} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read instruction file {file}: {error}") from None
    if not isinstance(records, list) or not records:
        raise UsageError(f"{file} must hold a non-empty list of records with instruction/input/output fields")
    examples = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise UsageError(f"{file} record {number} lacks 'instruction' or 'output'; every record needs both")
        template = PROMPT_WITH_INPUT if str(record.get("input") or "").strip() else PROMPT_WITHOUT_INPUT
        prompt = template.format(instruction=record["instruction"], input=record.get("input") or "")
        examples.append(InstructionExample(prompt, str(record["output"])))
    return examples
