"""How many layers does a classification task need? (Why Lift so Heavy, prompt-based fine-tuning.)

For each k, keep only the first k decoder layers (the final norm stays), fine-tune on a labelled
set and report test accuracy, giving the accuracy-against-depth curve. Two ways to read a class
out of the last position of the prompt:

* ``verbalizer``: the LM head's logits of one answer word per class (" positive", " negative"),
  so the model keeps its pretrained output space and the prompt does part of the work;
* ``head``: a fresh linear classification head on the final-normed hidden state.

The embedding matrix (tied to the LM head in most small models) stays frozen: it holds most of the
parameters of a small model, and freezing it keeps the verbalizer rows meaningful and the run
inside a CPU budget. Everything else of the kept layers trains.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Sequence
from typing import Annotated, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from layerprune.data import TrainingSet
from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import remove_layers
from layerprune.options import Config, NO_FLAG, Parse, SEED_RANGE, comma_ints, comma_list, option

log = logging.getLogger(__name__)

HEAD_KINDS = ("verbalizer", "head")


class Labelled(Protocol):
    texts: list[str]
    labels: list[int]
    label_names: list[str]


def unescape_newlines(text: str) -> str:
    """A ``--template`` as typed in a shell, where a line break is written ``\\n``."""
    return text.replace("\\n", "\n")


class ClassificationSettings(Config):
    """One curve: which depths, which heads, how much data and training (the ``classification``
    options of an evaluation, declared once for the API, a recipe and the flags)."""

    unit = "classification"

    ks: Annotated[tuple[int, ...], Parse(comma_ints)] = option(
        (), "layer counts to keep, e.g. 1,2,4,8,16,30 (needed with classify)", flag="--k", metavar="K,...")
    heads: Annotated[tuple[str, ...], Parse(comma_list)] = option(HEAD_KINDS, f"read-outs: {', '.join(HEAD_KINDS)}",
                                                                 metavar="HEAD,...")
    template: Annotated[str, Parse(unescape_newlines)] = option(
        "{text}\nAnswer:", "prompt with {text}, e.g. '{text}\\nSentiment:'")
    verbalizer: Annotated[tuple[str, ...], Parse(comma_list)] = option(
        (), "answer words, one per class in label order (default: the label names)", metavar="WORD,...")
    train_size: int = option(512, "training examples", minimum=1)
    test_size: int = option(400, "test examples", minimum=1)
    epochs: int = option(2, "training epochs per k", minimum=1)
    batch_size: int = option(16, "examples per training step", minimum=1, flag=NO_FLAG)
    lr: float = option(1e-4, "AdamW learning rate of the kept layers (positive)")
    # a fresh head starts from random and needs larger steps than pretrained layers
    head_lr: float = option(1e-3, "learning rate of the new classification head (positive)")
    max_tokens: int = option(64, "prompt length in tokens, the text cut from the left", minimum=1, flag=NO_FLAG)
    seed: int = option(0, "seed of the example subsets and of the training order", flag=NO_FLAG,
                       minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])

    def check(self) -> None:
        """Fail before loading data or models if the settings cannot work."""
        if any(k < 1 for k in self.ks):
            self.refuse("ks", f"must list layer counts of at least 1, got {list(self.ks)}; e.g. 1,2,4,8")
        unknown = [head for head in self.heads if head not in HEAD_KINDS]
        if unknown or not self.heads:
            self.refuse("heads", f"lists unknown classification head(s) {unknown}; use {', '.join(HEAD_KINDS)}")
        if "{text}" not in self.template:
            self.refuse("template", "must contain {text}, e.g. '{text}\\nSentiment:'")
        for name in ("lr", "head_lr"):
            if getattr(self, name) <= 0:
                self.refuse(name, f"must be positive, got {getattr(self, name)}")

    def check_depths(self, num_layers: int | None) -> None:
        """Refuse a curve without depths, or with a depth beyond the model's ``num_layers`` (when known)."""
        if not self.ks or (num_layers is not None and max(self.ks) > num_layers):
            upper = num_layers if num_layers is not None else "L"
            self.refuse("ks", f"{list(self.ks)} must list layer counts between 1 and {upper}, e.g. 1,2,4,8")


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int], template: str,
           max_tokens: int) -> TrainingSet:
    """Tokenize prompts, cutting the *text* from the left so the question at the end survives."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    prompts = [template.format(text=" ".join(text.split())) for text in texts]
    batch = tokenizer(prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return TrainingSet(batch["input_ids"], batch["attention_mask"], torch.tensor(list(labels), dtype=torch.long),
                       "classification prompts")


def verbalizer_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """One distinct token per class: the first token of ' word' (or of 'word' if those collide)."""
    for prefix in (" ", ""):
        ids = [tokenizer(prefix + word, add_special_tokens=False)["input_ids"][0] for word in words]
        if len(set(ids)) == len(ids):
            return ids
    raise UsageError(f"the verbalizer words {list(words)} start with the same token; choose words that differ "
                     "in their first token")


def subsample(data: Labelled, size: int, seed: int) -> tuple[list[str], list[int]]:
    """A seeded random subset (all of it if smaller), so every k sees exactly the same examples."""
    order = list(range(len(data.texts)))
    random.Random(seed).shuffle(order)
    chosen = order[:size]
    return [data.texts[i] for i in chosen], [int(data.labels[i]) for i in chosen]


class FirstLayersClassifier(nn.Module):
    """The truncated LM with one of the two read-outs on the last position."""

    def __init__(self, causal_lm: nn.Module, kind: str, num_classes: int, verbalizer_ids: Sequence[int]) -> None:
        super().__init__()
        self.backbone = causal_lm.base_model  # embeddings, kept layers, final norm
        self.kind = kind
        if kind == "verbalizer":
            lm_head = causal_lm.get_output_embeddings()
            rows = torch.tensor(list(verbalizer_ids))
            self.register_buffer("answer_weight", lm_head.weight.detach()[rows].clone())
            bias = getattr(lm_head, "bias", None)
            self.register_buffer("answer_bias", bias.detach()[rows].clone() if bias is not None else None)
        else:
            hidden = causal_lm.get_input_embeddings().embedding_dim
            self.head = nn.Linear(hidden, num_classes)
        self.backbone.get_input_embeddings().weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = hidden[:, -1]  # left padding: the prompt's last token is at the end of every row
        if self.kind == "verbalizer":
            return F.linear(last, self.answer_weight, self.answer_bias)
        return self.head(last)


def train_and_test(classifier: FirstLayersClassifier, train: TrainingSet, test: TrainingSet,
                   settings: ClassificationSettings) -> float:
    """Fine-tune with AdamW for ``epochs`` over ``train``; return accuracy on ``test``."""
    backbone = [p for p in classifier.backbone.parameters() if p.requires_grad]
    groups = [{"params": backbone, "lr": settings.lr}]
    if classifier.kind == "head":
        groups.append({"params": list(classifier.head.parameters()), "lr": settings.head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    classifier.train()
    for _ in range(settings.epochs):
        for rows in torch.randperm(len(train), generator=generator).split(settings.batch_size):
            logits = classifier(train.input_ids[rows], train.attention_mask[rows])
            loss = F.cross_entropy(logits, train.labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    classifier.eval()
    correct = 0
    with torch.no_grad():
        for rows in torch.arange(len(test)).split(settings.batch_size * 2):
            predictions = classifier(test.input_ids[rows], test.attention_mask[rows]).argmax(-1)
            correct += int((predictions == test.labels[rows]).sum())
    return correct / len(test)


def classification_curve(loaded: LoadedModel, train_data: Labelled, test_data: Labelled,
                         settings: ClassificationSettings) -> dict[str, Any]:
    """Accuracy for every k in ``settings.ks`` and every head kind, with timings and chance level."""
    settings.check_depths(loaded.num_layers)
    words = list(settings.verbalizer) or list(train_data.label_names)
    if len(words) != len(train_data.label_names):
        settings.refuse("verbalizer", f"has {len(words)} words for {len(train_data.label_names)} classes "
                                      f"({', '.join(train_data.label_names)}); give one word per class")
    answer_ids = verbalizer_token_ids(loaded.tokenizer, words) if "verbalizer" in settings.heads else []
    train = encode(loaded.tokenizer, *subsample(train_data, settings.train_size, settings.seed), settings.template,
                   settings.max_tokens)
    test = encode(loaded.tokenizer, *subsample(test_data, settings.test_size, settings.seed + 1), settings.template,
                  settings.max_tokens)
    counts = torch.bincount(test.labels, minlength=len(words))
    curve: dict[str, Any] = {
        "accuracy": {kind: {} for kind in settings.heads}, "seconds": {kind: {} for kind in settings.heads},
        "chance": float(counts.max()) / len(test), "num_layers": loaded.num_layers, "verbalizer": words,
        "train_examples": len(train), "test_examples": len(test), "settings": settings.model_dump(mode="json"),
    }
    for k in sorted(set(settings.ks)):
        for kind in settings.heads:
            torch.manual_seed(settings.seed)
            model = copy.deepcopy(loaded.model)
            if k < loaded.num_layers:
                remove_layers(model, range(k, loaded.num_layers), loaded.adapter)
            classifier = FirstLayersClassifier(model, kind, len(words), answer_ids)
            start = time.perf_counter()
            accuracy = train_and_test(classifier, train, test, settings)
            curve["accuracy"][kind][str(k)] = accuracy
            curve["seconds"][kind][str(k)] = round(time.perf_counter() - start, 1)
            log.info("k=%d %s: accuracy %.3f (%.0f s)", k, kind, accuracy, curve["seconds"][kind][str(k)])
    return curve
