"""Training sequences for healing: plain text windows or instruction examples.

Text sources (``wiki-sample``, ``news-sample``, files, hub names) become fixed-length windows
through the data layer, and every token is a target. Alpaca-style instruction files
(``instruction``/``input``/``output`` records in JSON or JSONL) become prompt+response sequences in
which only the response tokens are targets, so the model is taught to answer, not to echo prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from layerprune.data import TrainingSet, build_calibration, load_instructions
from layerprune.errors import OptionError

IGNORE_INDEX = -100
_INSTRUCTION_KEYS = {"instruction", "output"}


def is_instruction_file(source: str | Path) -> bool:
    """Whether ``source`` is a JSON/JSONL file whose first record has Alpaca's keys."""
    path = Path(source).expanduser()
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return False
    try:
        if path.suffix == ".jsonl":
            with path.open() as handle:
                first = json.loads(next((line for line in handle if line.strip()), "null"))
        else:
            records = json.loads(path.read_text())
            first = records[0] if isinstance(records, list) and records else records
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and _INSTRUCTION_KEYS <= set(first)


def instruction_rows(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], seq_len: int,
                     description: str) -> TrainingSet:
    """Tokenize (prompt, response) pairs; loss only on the response (and its end-of-text token), as
    :func:`prompted_rows` lays them out."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompted_rows([(tokenizer(prompt, add_special_tokens=True)["input_ids"],
                           tokenizer(response, add_special_tokens=False)["input_ids"] + eos)
                          for prompt, response in pairs], padding_token(tokenizer), seq_len, description)


def padding_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id right padding uses: the pad token, else the end token (never attended, never a target)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompted_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int, seq_len: int,
                  description: str) -> TrainingSet:
    """Rows of (prompt ids, response ids) pairs with the loss on the response only: an instruction's
    answer, or the original's own continuation of a prompt (self-generated data).

    Rows are right-padded to ``seq_len``; with a causal mask real tokens never see the padding, and
    padded positions are excluded from both attention and loss. Too-long rows are cut at the end.
    """
    rows, masks, labels = [], [], []
    for prompt_ids, response_ids in pairs:
        ids = (list(prompt_ids) + list(response_ids))[:seq_len]
        targets = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))[:seq_len]
        padding = seq_len - len(ids)
        rows.append(ids + [pad] * padding)
        masks.append([1] * len(ids) + [0] * padding)
        labels.append(targets + [IGNORE_INDEX] * padding)
    label_tensor = torch.tensor(labels)
    if not (label_tensor != IGNORE_INDEX).any():
        raise OptionError.about("seq_len", f"{seq_len} leaves no room for a response token of {description}; "
                                           "raise it")
    return TrainingSet(torch.tensor(rows), torch.tensor(masks), label_tensor, description)


def load_training_data(tokenizer: PreTrainedTokenizerBase, source: str | Path | TrainingSet, *, samples: int,
                       seq_len: int, seed: int, sampling: str,
                       text_field: str | None) -> TrainingSet:
    """Resolve ``source`` into training rows: windows of the train split of a text source, drawn as
    calibration windows are (``sampling``, ``text_field``), or the examples of an instruction file."""
    if isinstance(source, TrainingSet):
        return source
    if is_instruction_file(source):
        if sampling != "random":
            raise OptionError.about("sampling", f"{sampling} applies to text data; {source} is an instruction file, "
                                                "which gives one row per example; leave sampling unset")
        examples = load_instructions(source)[:samples]
        return instruction_rows(tokenizer, [(e.prompt, e.response) for e in examples], seq_len, str(source))
    calibration = build_calibration(tokenizer, str(source), split="train", samples=samples,
                                    seq_len=seq_len, seed=seed, sampling=sampling, text_field=text_field)
    ids, mask = calibration.input_ids, calibration.attention_mask
    windows = "" if sampling == "random" else f", {sampling} windows"
    return TrainingSet(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX), f"{source} (train split{windows})")
