"""Partial-layer fine-tuning (Reassessing Layer Pruning, Lu et al. 2024).

Train only the LM head and the last ``k`` decoder layers (paper default 3); everything else stays
frozen. The frozen prefix runs without storing activations for backward, so this is cheap in
both time and memory. Where the LM head is tied to the input embeddings (SmolLM2), training the
head necessarily changes the embeddings too (one tensor); the summary says so. Its gradient is
taken from the head's use only: the embedding lookup's output is detached, so backward stops at
the first trained layer instead of running through the whole frozen prefix to reach the lookup
(on SmolLM2 that prefix is most of the backward pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from layerprune.errors import OptionError
from layerprune.healing.base import HEALERS, DistillOptions, HealConfig, Healer, HealOutcome
from layerprune.healing.data import TrainingSet
from layerprune.healing.objectives import distill_note, fit_language_model
from layerprune.models.loading import LoadedModel
from layerprune.options import option


def unfreeze_head_and_last_layers(loaded: LoadedModel, k: int) -> None:
    """Freeze every parameter, then unfreeze the LM head and the last ``k`` decoder layers."""
    model = loaded.model
    model.requires_grad_(False)
    model.get_submodule(loaded.adapter.lm_head).requires_grad_(True)
    for layer in loaded.adapter.decoder_layers(model)[-k:]:
        layer.requires_grad_(True)


@contextmanager
def head_only_gradient(model: nn.Module) -> Iterator[None]:
    """Detach the input-embedding output while training, so no gradient flows through the frozen prefix."""

    def detach(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach()

    handle = model.get_input_embeddings().register_forward_hook(detach)
    try:
        yield
    finally:
        handle.remove()


class PartialFineTuningOptions(DistillOptions):
    train_layers: int = option(3, "the last K decoder layers to train, with the LM head (paper default 3)", minimum=1)


@HEALERS.register("partial-ft")
class PartialFineTuning(Healer):
    options_class = PartialFineTuningOptions
    default_lr = 5e-5

    def check_settings(self, settings: HealConfig, num_layers: int | None) -> None:
        train_layers = settings.options.train_layers
        if num_layers is not None and train_layers > num_layers:
            raise OptionError.about("train_layers", f"{train_layers} exceeds the model's {num_layers} layers; "
                                    f"choose 1..{num_layers}")

    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealConfig,
            original: LoadedModel | None) -> HealOutcome:
        unfreeze_head_and_last_layers(loaded, settings.options.train_layers)
        tied = getattr(loaded.model.config, "tie_word_embeddings", False)
        with head_only_gradient(loaded.model):
            report = fit_language_model(loaded.model, data, settings, original,
                                    lr=settings.training.lr or self.default_lr,
                                        fingerprint=settings.fingerprint(), label="partial-ft")
        loaded.model.requires_grad_(False)
        head = "LM head (tied to the input embeddings, so those changed too)" if tied else "LM head"
        summary = (f"trained the {head} and the last {settings.options.train_layers} decoder layers with "
                   f"{distill_note(settings.options)}; all other weights are unchanged")
        return HealOutcome(loaded, summary, report.trainable_parameters, report.losses, report.seconds)
