"""LoRA and QLoRA healing through ``peft``, merged back into plain weights before export.

The modules LoRA adapts come from the architecture adapter (``lora_targets``), so each family gets
its own projection names. After training the adapters are merged (``W += B @ A * alpha / r``) and
the result is an ordinary model of the original class: the exported checkpoint needs no peft.

QLoRA trains the same adapters on a 4-bit (NF4) copy of the base weights via bitsandbytes on a
GPU, then merges them into the full-precision weights, so the export is not quantized either.
"""

from __future__ import annotations

import importlib.util
import tempfile
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from layerprune.errors import UsageError, mention
from layerprune.healing.base import HEALERS, DistillOptions, HealConfig, Healer, HealOutcome
from layerprune.healing.data import TrainingSet
from layerprune.healing.engine import TrainReport
from layerprune.healing.objectives import distill_note, fit_language_model
from layerprune.models.loading import LoadedModel
from layerprune.options import option

if TYPE_CHECKING:
    from peft import LoraConfig


class LoRAOptions(DistillOptions):
    lora_rank: int = option(16, "adapter rank r (alpha = 2r)", minimum=1)


def lora_config(loaded: LoadedModel, options: LoRAOptions) -> LoraConfig:
    """Rank ``r`` adapters (alpha = 2r, no dropout) on the family's attention and MLP projections."""
    from peft import LoraConfig  # deferred: peft is the optional heal extra (see _require_peft)

    present = {name.rpartition(".")[2] for name, _ in loaded.model.named_modules()}
    targets = [t for t in loaded.adapter.lora_targets if t in present]
    if not targets:
        raise UsageError(f"none of the LoRA target modules {list(loaded.adapter.lora_targets)} exist in this "
                         f"{loaded.model.config.model_type} model; use {mention('method')} partial-ft")
    return LoraConfig(r=options.lora_rank, lora_alpha=2 * options.lora_rank, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def _require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise UsageError("LoRA healing needs peft; install it with: pip install 'layerprune[heal]'")


def _summary(options: LoRAOptions, kind: str, targets: list[str]) -> str:
    return (f"{kind} (rank {options.lora_rank}, alpha {2 * options.lora_rank}) on {', '.join(targets)} with "
            f"{distill_note(options)}; adapters merged into the weights, so the checkpoint is plain")


@HEALERS.register("lora")
class LoRA(Healer):
    options_class = LoRAOptions
    default_lr = 2e-4

    def check_settings(self, settings: HealConfig, num_layers: int | None) -> None:
        _require_peft()

    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealConfig,
            original: LoadedModel | None) -> HealOutcome:
        from peft import get_peft_model  # deferred: the optional heal extra

        config = lora_config(loaded, settings.options)
        peft_model = get_peft_model(loaded.model, config)
        report = fit_language_model(peft_model, data, settings, original, lr=settings.training.lr or self.default_lr,
                                    fingerprint=settings.fingerprint(), label="lora")
        loaded.model = peft_model.merge_and_unload()
        loaded.model.requires_grad_(False)
        return _outcome(loaded, report, _summary(settings.options, "LoRA", sorted(config.target_modules)))


@HEALERS.register("qlora")
class QLoRA(LoRA):
    """LoRA's adapters, learning rate and objective, trained over a 4-bit copy of the base weights."""

    def check_settings(self, settings: HealConfig, num_layers: int | None) -> None:
        super().check_settings(settings, num_layers)
        if not torch.cuda.is_available():
            raise UsageError("qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and none is available; "
                             "use --method lora on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError("qlora needs bitsandbytes, which is not installed; pip install bitsandbytes, "
                             "or use --method lora")

    def run(self, loaded: LoadedModel, data: TrainingSet, settings: HealConfig,
            original: LoadedModel | None) -> HealOutcome:
        # deferred: peft is the optional heal extra
        from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training, set_peft_model_state_dict

        config = lora_config(loaded, settings.options)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        with tempfile.TemporaryDirectory(prefix="layerprune-qlora-") as scratch:
            loaded.model.save_pretrained(scratch)
            quantized = AutoModelForCausalLM.from_pretrained(scratch, quantization_config=quantization,
                                                             device_map={"": torch.cuda.current_device()})
        quantized = prepare_model_for_kbit_training(quantized,
                                                    use_gradient_checkpointing=settings.training.gradient_checkpointing)
        peft_quantized = get_peft_model(quantized, config)
        report = fit_language_model(peft_quantized, data, settings, original,
                                    lr=settings.training.lr or self.default_lr, fingerprint=settings.fingerprint(),
                                    label="qlora")
        adapters = get_peft_model_state_dict(peft_quantized)
        full_precision = get_peft_model(loaded.model, config)
        set_peft_model_state_dict(full_precision, adapters)
        loaded.model = full_precision.merge_and_unload()
        loaded.model.requires_grad_(False)
        return _outcome(loaded, report, _summary(settings.options, "QLoRA (NF4 base)", sorted(config.target_modules)))


def _outcome(loaded: LoadedModel, report: TrainReport, summary: str) -> HealOutcome:
    return HealOutcome(loaded, summary, report.trainable_parameters, report.losses, report.seconds)
