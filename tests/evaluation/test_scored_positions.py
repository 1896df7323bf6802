"""The LM that scores only the asked positions gives lm-eval's own answers, on every tiny family."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from layerprune.evaluation.scored_positions import ScoredPositionsLM
from layerprune.models.tiny import TINY_FAMILIES
from tests.helpers import tiny_loaded

MAX_LENGTH = 40


def _requests(model: torch.nn.Module, seed: int) -> list:
    """Requests of the kinds the suite makes: one-token answers to a shared prompt (lm-eval's
    cached case) and the same tokens split elsewhere, multi-token answers, answers the model would write itself (so the greedy flag
    is true for some), and inputs longer than the model's length (truncated from the left)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(6):
        context = [rng.randrange(256) for _ in range(rng.randint(3, 30))]
        for _ in range(3):  # one-token choices after one prompt
            requests.append((None, context, [rng.randrange(256)]))
        # the same input split elsewhere: a longer answer scored from the same forward pass
        requests.append((None, context[:-2], [*context[-2:], requests[-1][2][0]]))
        requests.append((None, context, [rng.randrange(256) for _ in range(rng.randint(2, 6))]))
        with torch.no_grad():  # the model's own greedy answer of three tokens
            greedy = list(context)
            for _ in range(3):
                greedy.append(int(model(torch.tensor([greedy])).logits[0, -1].argmax()))
        requests.append((None, context, greedy[len(context):]))
    long_context = [rng.randrange(256) for _ in range(MAX_LENGTH + 15)]
    requests.append((None, long_context, [rng.randrange(256) for _ in range(4)]))
    return requests


def _by_hand(model: torch.nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The summed log-probability of ``continuation`` after ``context`` from the full logits of one
    unbatched forward pass in float64, and whether greedy decoding writes it: lm-eval's definition,
    with its left truncation to the model's length."""
    whole = (context + continuation)[-(MAX_LENGTH + 1):]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    rows, targets = log_probs[-len(continuation):], torch.tensor(continuation)
    return float(rows.gather(1, targets.unsqueeze(1)).sum()), bool((rows.argmax(-1) == targets).all())


def _assert_same(answers: list[tuple[float, bool]], expected: list[tuple[float, bool]]) -> None:
    assert [greedy for _, greedy in answers] == [greedy for _, greedy in expected]
    assert [score for score, _ in answers] == pytest.approx([score for score, _ in expected], abs=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_scored_positions_give_the_answers_of_a_full_forward_pass(family: str) -> None:
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    loaded = tiny_loaded(family, num_layers=3)
    requests = _requests(loaded.model, seed=len(family))
    common = dict(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4, max_length=MAX_LENGTH)

    head_rows = []
    head = loaded.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, inputs, output: head_rows.append(inputs[0].shape[:-1].numel()))
    try:
        answers = ScoredPositionsLM(**common)._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        hook.remove()

    _assert_same(answers, [_by_hand(loaded.model, context, continuation) for _, context, continuation in requests])
    assert any(greedy for _, greedy in answers)
    # the head ran on a fraction of the positions a full forward pass computes it for
    full_rows = sum(min(len(c) + len(a), MAX_LENGTH + 1) - 1 for _, c, a in requests)
    assert sum(head_rows) < full_rows / 2
    # lm-eval's own HFLM agrees wherever its one-token cache applies as meant: requests that share
    # an input but split it elsewhere get only their last token scored there
    ordinary = [r for r in requests if sum(r[1] + r[2][:-1] == o[1] + o[2][:-1] for o in requests) == 1
                or len(r[2]) == 1 and all(len(o[2]) == 1 for o in requests if r[1] + r[2][:-1] == o[1] + o[2][:-1])]
    assert len(ordinary) < len(requests)
    _assert_same(ScoredPositionsLM(**common)._loglikelihood_tokens(ordinary, disable_tqdm=True),
                 HFLM(**common)._loglikelihood_tokens(ordinary, disable_tqdm=True))
