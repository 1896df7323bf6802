"""The examples of the ``lp_offline`` evaluation suite, built from held-out text in the wheels.

Four tasks that, unlike one sentiment task, can tell pruning methods apart: next-sentence choice
(HellaSwag-like), last-word cloze (LAMBADA-like), balanced sentiment and topic. Every example comes
from the *test* split the data layer defines (calibration and healing read the train split), and
every builder is a pure function of that text and a fixed seed, so the same wheel gives the same
examples on every machine (the tests check a digest of them). The news and wiki corpora repeat
some sentences across documents (a story republished, a quoted tweet), so the corpus builders also
take the word 8-grams of the other splits (``seen``, from ``shingles``) and drop every example
that shares one with them.

Examples are shuffled once with the seed: lm-eval's ``--limit N`` scores the first N, which must
be a fair sample (the sources are ordered by topic or by class, so their first 100 are not).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

from layerprune.data.labelled import LabelledDataset

SUITE_SEED = 0
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“A-Z])")
_WORD_EDGES = ".,;:!?\"'()[]“”‘’"
SHINGLE_WORDS = 8

# next-sentence choice: sentences short enough to score fast, long enough to carry meaning
ENDING_WORDS = (8, 40)  # at least one whole 8-gram: a shared ending is always found in `seen`
NEXT_SENTENCE_POSITIONS = (2, 4, 6)  # the endings: the 3rd, 5th and 7th sentence, each after two
# cloze: the passage before the target word, in words
CLOZE_CONTEXT_WORDS = (20, 60)
CLOZE_MIN_TARGET_LETTERS = 4
CLOZE_SKIP_WORDS = 3  # a sentence's first words have too little of it before them
# classification
SENTIMENT_PER_CLASS = 500
TOPIC_PER_CLASS = 200
TOPIC_MAX_CHARS = 600
TOPIC_WORDS = {"acq": "acquisitions", "crude": "oil", "earn": "earnings", "grain": "grain", "interest": "interest",
               "money-fx": "currency", "ship": "shipping", "trade": "trade"}  # one token each in SmolLM2: one forward


def sentences(text: str) -> list[str]:
    """The sentences of ``text``'s prose lines (headings and list items, lines under 8 words, are skipped)."""
    prose = [line.strip() for line in text.split("\n") if len(line.split()) >= 8]
    return [sentence.strip() for line in prose for sentence in _SENTENCE_END.split(" ".join(line.split()))
            if sentence.strip()]


def shingles(text: str) -> set[int]:
    """Hashes of ``text``'s runs of ``SHINGLE_WORDS`` words (the whole text if shorter): two texts
    that share a run share a sentence-sized piece, however each was cut into sentences."""
    words = text.split()
    return {hash(" ".join(words[i:i + SHINGLE_WORDS])) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}


def _seen_in(text: str, seen: AbstractSet[int]) -> bool:
    return not seen.isdisjoint(shingles(text))


def rows_digest(rows: Sequence[dict]) -> str:
    """SHA-256 of the rows as written (one sorted-key JSON object a line): the examples' identity."""
    text = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def _shuffled(rows: list[dict], rng: random.Random) -> list[dict]:
    rng.shuffle(rows)
    return rows


def next_sentence_rows(articles: Sequence[str], seen: AbstractSet[int] = frozenset(),
                       seed: int = SUITE_SEED) -> list[dict]:
    """HellaSwag-like: two sentences of a news article, and its true next sentence among three
    sentences drawn from *other* articles (``label`` is the true one's index in ``choices``).

    ``articles`` are "title\\n\\nbody" documents; only the body's sentences are used, and none that
    shares a word 8-gram with ``seen``.
    """
    rng = random.Random(seed)
    low, high = ENDING_WORDS
    bodies = [sentences(article.split("\n\n", 1)[-1]) for article in articles]
    pool = [(index, sentence) for index, body in enumerate(bodies) for sentence in body
            if low <= len(sentence.split()) <= high and not _seen_in(sentence, seen)]
    rows = []
    for index, body in enumerate(bodies):
        for position in NEXT_SENTENCE_POSITIONS:
            if position >= len(body) or not low <= len(body[position].split()) <= high or any(
                    _seen_in(sentence, seen) for sentence in body[position - 2:position + 1]):
                continue
            distractors: list[str] = []
            while len(distractors) < 3:
                other, sentence = pool[rng.randrange(len(pool))]
                if other != index and sentence not in distractors and sentence != body[position]:
                    distractors.append(sentence)
            choices = [body[position], *distractors]
            rng.shuffle(choices)
            rows.append({"context": " ".join(body[position - 2:position]), "choices": choices,
                         "label": choices.index(body[position])})
    return _shuffled(rows, rng)


def _bare(word: str) -> str:
    return word.strip(_WORD_EDGES)


def cloze_rows(articles: Sequence[str], seen: AbstractSet[int] = frozenset(), seed: int = SUITE_SEED) -> list[dict]:
    """LAMBADA-like: a passage of wiki prose whose next word is to be predicted (greedy, every token).

    One target per sentence: the sentence's last word (LAMBADA's choice) if it qualifies, else its
    last qualifying word. A word qualifies if the passage makes it predictable by this rule: it has
    at least 4 letters, is not among the sentence's first 3 words, and **already occurs, verbatim,
    in the passage** before it (LAMBADA keeps targets humans guess from the passage; a repeated
    word is the mechanical stand-in). The passage is the sentence up to the target plus as many
    whole sentences before it as fit in 60 words, and at least 20 words. A sentence that shares a
    word 8-gram with ``seen`` gives no target.
    """
    low, high = CLOZE_CONTEXT_WORDS
    rows = []
    for article in articles:
        words_of = [sentence.split() for sentence in sentences(article)]
        for index, words in enumerate(words_of):
            if _seen_in(" ".join(words), seen):
                continue
            earlier: list[str] = []
            start = index
            while start > 0 and len(words_of[start - 1]) + len(earlier) + len(words) <= high + 1:
                start -= 1
                earlier = words_of[start] + earlier
            for position in range(len(words) - 1, CLOZE_SKIP_WORDS - 1, -1):
                target, passage = _bare(words[position]), earlier + words[:position]
                if (target.isalpha() and len(target) >= CLOZE_MIN_TARGET_LETTERS and low <= len(passage) <= high
                        and target in {_bare(word) for word in passage}):
                    rows.append({"context": " ".join(passage), "target": target})
                    break
    return _shuffled(rows, random.Random(seed))


def _per_class(data: LabelledDataset, cap: int, rng: random.Random) -> list[list[int]]:
    """Indices of each class, in a seeded random order, at most ``cap`` of each."""
    by_class: list[list[int]] = [[] for _ in data.label_names]
    for index, label in enumerate(data.labels):
        by_class[label].append(index)
    return [rng.sample(indices, min(cap, len(indices))) for indices in by_class]


def sentiment_rows(data: LabelledDataset, seed: int = SUITE_SEED) -> list[dict]:
    """Balanced sentiment: as many negative as positive reviews (up to 500 each), in random pairs of
    one of each, so every even ``--limit`` is balanced too and always answering one class scores 0.5."""
    rng = random.Random(seed)
    classes = _per_class(data, SENTIMENT_PER_CLASS, rng)
    size = min(len(indices) for indices in classes)
    rows = []
    for pair in zip(*(indices[:size] for indices in classes)):
        pair = list(pair)
        rng.shuffle(pair)
        rows += [{"text": " ".join(data.texts[i].split()), "label": data.labels[i], "choices": data.label_names}
                 for i in pair]
    return rows


def topic_rows(data: LabelledDataset, seed: int = SUITE_SEED) -> list[dict]:
    """Reuters R8 topics, at most 200 stories per topic (earnings and acquisitions are 80% of the
    split; capped, answering the largest topic scores about 0.25), stories cut to 600 characters
    at a word boundary, topics named by plain words (``TOPIC_WORDS``)."""
    rng = random.Random(seed)
    choices = [TOPIC_WORDS.get(name, name) for name in data.label_names]
    rows = []
    for indices in _per_class(data, TOPIC_PER_CLASS, rng):
        for i in indices:
            text = " ".join(data.texts[i].split())
            if len(text) > TOPIC_MAX_CHARS:
                text = text[:TOPIC_MAX_CHARS].rsplit(" ", 1)[0]
            rows.append({"text": text, "label": data.labels[i], "choices": choices})
    return _shuffled(rows, rng)
