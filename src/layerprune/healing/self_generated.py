"""``heal --data self-generated``: train a pruned model on what its original says.

Wiki text teaches a cut model the language; it does not teach it to say what the original said.
Fine-tuning on the original's own generations recovers far more of a cut's generative ability than
earlier repairs (arXiv 2602.01997), and it needs no data but prompts. The original continues
prompts drawn from ``prompts`` (its train split; the chat template's form for an instruct
tokenizer, as ``eval --generation``'s) greedily up to ``seq_len`` tokens, and each row trains on the
continuation only (the prompt is context, as an instruction's). Any healing method takes the rows.

Generation is the costly part (a forward pass per new token), so the continuations are cached in
the user cache dir under a key of everything they depend on: the original's weights (a digest of
its parameters, not only its name: a folder can be overwritten), the prompts' source and the
settings. Greedy decoding and a seeded draw of prompts make them deterministic; a second healing
with the same settings reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch

from layerprune.cache import cache_dir
from layerprune.data import TrainingSet
from layerprune.data.prompts import draw_prompts
from layerprune.errors import OptionError
from layerprune.healing.base import HealConfig
from layerprune.healing.data import padding_token, prompted_rows
from layerprune.models.generation import greedy_continuations
from layerprune.models.loading import LoadedModel
from layerprune.outputs import write_json_atomic

log = logging.getLogger(__name__)

CACHE_FOLDER = "self-generated"
"""The cache dir's folder of generated continuations, one JSON file per key."""


def generation_settings(config: HealConfig, rows: int) -> dict[str, Any]:
    """Everything the continuations depend on besides the original's weights: what the healing
    entry records of the data, and (with the weights' digest) the cache key."""
    training = config.training
    return {"prompts": str(config.prompts), "split": "train", "text_field": training.text_field, "rows": rows,
            "prompt_tokens": config.prompt_tokens, "seq_len": training.seq_len, "seed": training.seed,
            "decoding": "greedy"}


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of a model's parameters: their names, shapes and sums (in float64, one pass, no copy of
    the weights), so a changed model misses the cache where its name alone would hit it."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}:{tuple(parameter.shape)}:{float(parameter.detach().double().sum()):.17g};".encode())
    return digest.hexdigest()


def cache_key(original: LoadedModel, settings: dict[str, Any]) -> str:
    """The cache file's name: a hash of the original's weights digest and the generation settings."""
    text = json.dumps({"weights": weights_digest(original.model), **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def self_generated_rows(original: LoadedModel, config: HealConfig, rows: int) -> tuple[TrainingSet, dict[str, Any]]:
    """``rows`` training rows of the original's greedy continuations of prompts (see the module
    docstring), and what the healing entry records of them: the settings, the original, the cache
    key and the tokens generated."""
    tokenizer = original.tokenizer
    settings = generation_settings(config, rows)
    key = cache_key(original, settings)
    path = cache_dir() / CACHE_FOLDER / f"{key}.json"
    if path.is_file():
        log.info("self-generated data: reading the cached continuations %s", path)
        cached = json.loads(path.read_text())
        prompts, continuations = cached["prompts"], cached["continuations"]
    else:
        prompts = draw_prompts(tokenizer, str(config.prompts), count=rows, prompt_tokens=config.prompt_tokens,
                               split="train", seed=config.training.seed, text_field=config.training.text_field)
        longest = max(map(len, prompts))
        if longest >= config.training.seq_len:  # a chat template's turn can outgrow the prompt's text tokens
            raise OptionError.about("prompt_tokens", f"{config.prompt_tokens} gives prompts of up to {longest} tokens "
                                                     f"in the chat template, leaving no room for a continuation in "
                                                     f"seq_len {config.training.seq_len}; use fewer prompt tokens or "
                                                     "a longer seq_len")
        log.info("self-generated data: the original continues %d prompts", rows)
        continuations = greedy_continuations(original.model, prompts, config.training.seq_len - longest,
                                             tokenizer.eos_token_id, batch_size=config.training.batch_size)
        write_json_atomic(path, {"settings": settings, "original": original.source, "prompts": prompts,
                                 "continuations": continuations})
    training = prompted_rows(list(zip(prompts, continuations)), padding_token(tokenizer), config.training.seq_len,
                             f"{original.source}'s greedy continuations of {config.prompts} prompts")
    record = {"source": str(config.data), **settings, "original": original.source, "cache_key": key,
              "generated_tokens": sum(map(len, continuations))}
    return training, record
