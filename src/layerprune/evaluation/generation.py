"""Generation agreement: do the original and a pruned model say the same thing after the same prompt?

Loglikelihood scores hide what users see: a cut can keep its multiple-choice accuracy and lose
its generations (arXiv 2602.01997). Both models continue the same held-out prompts greedily; the
record says how many tokens each continuation follows the original's before it first differs
(a continuation identical to the original's counts all its tokens), the share of identical
continuations, and a few examples side by side, so a reader sees what changed and not only how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

EXAMPLES = 3
"""Side-by-side examples kept in the record and the Markdown report: enough to read, few enough to skim."""


def agreed_tokens(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Tokens of ``candidate`` before its first difference from ``reference`` (their common prefix)."""
    count = 0
    for ours, theirs in zip(reference, candidate):
        if ours != theirs:
            break
        count += 1
    return count


def generation_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict[str, float]:
    """``{"prompts", "mean_agreed_tokens", "identical"}`` of two models' continuations of the same
    prompts: the mean number of tokens before the first divergence and the share of continuations
    equal token for token (an early end token counts as a token)."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"need the same non-zero number of continuations, got {len(reference)} and {len(candidate)}")
    agreed = [agreed_tokens(ours, theirs) for ours, theirs in zip(reference, candidate)]
    return {"prompts": len(reference), "mean_agreed_tokens": sum(agreed) / len(agreed),
            "identical": sum(list(ours) == list(theirs) for ours, theirs in zip(reference, candidate)) / len(agreed)}


def side_by_side(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                 reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """The first :data:`EXAMPLES` prompts with both continuations as text, and where they part."""
    return [{"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
             "original": tokenizer.decode(ours, skip_special_tokens=True),
             "model": tokenizer.decode(theirs, skip_special_tokens=True), "agreed_tokens": agreed_tokens(ours, theirs)}
            for prompt, ours, theirs in list(zip(prompts, reference, candidate))[:EXAMPLES]]
