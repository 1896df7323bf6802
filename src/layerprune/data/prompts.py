"""Prompts for generation: held-out pieces of text a model continues (or answers, if it chats).

Generation agreement (``eval --generation``) and self-generated healing data (``heal --data
self-generated``) both need prompts drawn reproducibly from a text source. A prompt is a seeded
random window of ``prompt_tokens`` text tokens of the split's token stream (the calibration
windows' ``random`` sampling), after the tokenizer's start tokens, as a base model sees text. A
tokenizer with a chat template (an instruct model) gets the window's text as a user turn with
the template's generation prompt instead: an instruct model is used by answering such turns, and
its continuation of a bare window is not what users see.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from layerprune.data.calibration import SAMPLINGS, WindowRequest, text_prefix
from layerprune.errors import OptionError


def _templated(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def draw_prompts(tokenizer: PreTrainedTokenizerBase, source: str | Path, *, count: int, prompt_tokens: int,
                 split: str, seed: int, text_field: str | None = None) -> list[list[int]]:
    """``count`` prompts (token ids) of ``prompt_tokens`` text tokens each from ``split`` of ``source``,
    drawn with ``seed``; in the chat template's form when the tokenizer has one.

    A prompt left with no token of text once in the template (a template that trims a window of
    blank lines to nothing) would ask the model to continue the template alone: it is refused,
    naming ``prompt_tokens``, before any model runs.
    """
    prefix = text_prefix(tokenizer)
    # the random sampling itself, not a calibration set: a one-token prompt is no window a model trains on
    windows, _ = SAMPLINGS.get("random").draw(WindowRequest(tokenizer, source, split, text_field, count,
                                                            len(prefix) + prompt_tokens, seed, prefix))
    if not getattr(tokenizer, "chat_template", None):
        return [row.tolist() for row in windows]
    bare = len(_templated(tokenizer, ""))
    prompts = []
    for index, row in enumerate(windows):
        prompt = _templated(tokenizer, tokenizer.decode(row[len(prefix):]))
        if len(prompt) <= bare:
            raise OptionError.about("prompt_tokens", f"{prompt_tokens} leaves prompt {index} of {source} with no "
                                                     "token of text after the chat template; use longer prompts")
        prompts.append(prompt)
    return prompts
