"""Architecture adapters: where each model family keeps its parts, read from data files.

Every family is one YAML file in ``layerprune/models/families/`` (the way mergekit keeps its
architectures as JSON): the dotted paths of the decoder-layer list, the embeddings, the final norm
and the LM head, what the head does to the logits (soft-capping, ``logit_scale``...), the attention
and MLP output projections and the norms around each sublayer, the config fields that hold one
entry per layer, checkpoint tensor names that differ from module names, surgery quirks and the
tiny test models. Adding a family is one new file; no code changes.

Unknown families fall back to :func:`infer_adapter`, which finds the single ``ModuleList`` of
blocks and warns, so that users of new architectures are not stopped by a missing table entry.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

import torch
import yaml
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from layerprune.errors import UsageError
from layerprune.registry import Registry

NORM_KINDS = ("rms", "rms_one_plus", "layer")


@dataclass(frozen=True)
class LogitStep:
    """One thing a family's head does to the LM head's output, with a value from the config.

    ``op`` is ``multiply`` (Cohere's ``logit_scale``), ``divide`` (Granite's ``logits_scaling``)
    or ``softcap`` (Gemma's ``final_logit_softcapping``: ``tanh(x / c) * c``). A config without
    the field, or with it null (or 0 for soft-capping), skips the step, as the models do.
    """

    op: str
    config_field: str

    OPS: ClassVar[tuple[str, ...]] = ("multiply", "divide", "softcap")

    def apply(self, logits: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
        value = getattr(config, self.config_field, None)
        if value is None or (self.op == "softcap" and not value):
            return logits
        if self.op == "multiply":
            return logits * value
        if self.op == "divide":
            return logits / value
        return torch.tanh(logits / value) * value


@dataclass(frozen=True)
class ConfigFlag:
    """A yes/no property that a family decides per checkpoint from one config field
    (``negate`` when the field says the opposite, as OPT's ``do_layer_norm_before``)."""

    config_field: str
    default: bool
    negate: bool = False

    def read(self, config: PretrainedConfig) -> bool:
        return bool(getattr(config, self.config_field, self.default)) != self.negate


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one model family keeps the parts that layer surgery, scoring and repair touch.

    ``layers``, ``embeddings``, ``final_norm``, ``head_projection`` and ``lm_head`` are module
    paths from the causal-LM model; the projections and norms are paths inside one decoder layer.
    ``post_norm`` and ``parallel_residual`` hold this checkpoint's values once the adapter has
    been resolved against a config (:meth:`for_config`; :func:`adapter_for` does it).
    """

    family: str
    layers: str
    embeddings: str
    final_norm: str
    lm_head: str = "lm_head"
    head_projection: str | None = None
    logit_scaling: tuple[LogitStep, ...] = ()
    attention_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    mlp_output: str = "mlp.down_proj"
    mlp_inputs: tuple[str, ...] = ()
    """Where the MLP is no module of its own (OPT's ``fc1``/``fc2`` sit in the layer): the projections
    feeding ``mlp_output``, which removing the MLP branch replaces along with it."""
    input_norm: str = "input_layernorm"
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_attention_norm: str | None = None
    post_mlp_norm: str | None = None
    branch_multiplier: str | None = None
    """The config field that multiplies each sublayer's output before it is added to the residual
    (Granite's ``residual_multiplier``): a repair that reads the MLP branch as added applies it."""
    norm_kind: str = "rms"
    post_norm: bool = False
    parallel_residual: bool = False
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    per_layer_config: tuple[str, ...] = ("layer_types",)
    sliding_flag: str | None = None
    checkpoint_names: tuple[tuple[str, str], ...] = ()
    surgery_refused_when: tuple[tuple[str, str], ...] = ()
    config_flags: tuple[tuple[str, ConfigFlag], ...] = ()
    inferred: bool = field(default=False, compare=False)

    @property
    def stream_between_branches(self) -> bool:
        """Whether a layer's MLP reads the residual stream as its attention left it (through
        ``pre_mlp_norm``): what branch scores, branch statistics and branch repairs read. Not in a
        parallel-residual layer, where both branches read the layer's input."""
        return not self.parallel_residual and self.pre_mlp_norm is not None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_decoder_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_path, _, name = self.layers.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def for_config(self, config: PretrainedConfig) -> ArchitectureAdapter:
        """This adapter with the per-checkpoint flags (``post_norm``, ``parallel_residual``) read from ``config``."""
        return dataclasses.replace(self, **{name: flag.read(config) for name, flag in self.config_flags})

    def pre_head_paths(self, model: nn.Module) -> list[str]:
        """The paths of the modules between the last decoder layer and the LM head, in order: final
        norm, then head projection. A declared one the model does not have (OPT-350m has no final
        norm; OPT models of equal widths have no ``project_out``) is left out, as its forward does."""
        return [path for path in (self.final_norm, self.head_projection)
                if path and optional_submodule(model, path) is not None]

    def scale_logits(self, logits: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
        """Apply the family's logit steps (after the LM head) to ``logits``."""
        for step in self.logit_scaling:
            logits = step.apply(logits, config)
        return logits

    def checkpoint_name(self, tensor: str) -> str | None:
        """The name checkpoints of this family store module tensor ``tensor`` under, where it differs
        (GPT-NeoX's ``embed_out.weight`` for ``lm_head.weight``; transformers renames it on load)."""
        return dict(self.checkpoint_names).get(tensor)

    def branch_modules(self, kind: str) -> tuple[str, ...]:
        """The paths (inside a layer) of the modules that compute branch ``kind`` (``attention`` or
        ``mlp``): the module holding its output projection, or, for an MLP that is no module of its
        own, its input projections and its output projection."""
        output = self.attention_outputs[0] if kind == "attention" else self.mlp_output
        parent = output.rpartition(".")[0]
        if parent:
            return (parent,)
        return (*self.mlp_inputs, output) if kind == "mlp" and self.mlp_inputs else ()

    def post_branch_norm(self, kind: str) -> str | None:
        """The norm (inside a layer) that normalises branch ``kind``'s output before it is added to the
        residual (Gemma's), or ``None``: what a repair scales to change what the branch adds."""
        return self.post_attention_norm if kind == "attention" else self.post_mlp_norm

    def branch_norms(self, kind: str) -> tuple[str, ...]:
        """The norms (inside a layer) that belong to branch ``kind``: before it and after it."""
        norms = (self.input_norm, self.post_attention_norm) if kind == "attention" else (
            self.pre_mlp_norm, self.post_mlp_norm)
        return tuple(norm for norm in norms if norm)

    def sublayer_refusal(self) -> str | None:
        """Why this family's attention and MLP branches cannot be removed apart (None: they can).

        An inferred adapter knows no branch; a post-norm checkpoint (OPT-350m) normalises the residual
        stream after each branch, so a branch's norm is part of the stream, not of the branch."""
        if self.inferred:
            return f"layerprune knows no branches of architecture {self.family!r} (it has no family file)"
        if self.post_norm:
            return f"this {self.family} checkpoint normalises the residual stream after each branch (post-norm)"
        if not self.branch_modules("attention") or not self.branch_modules("mlp"):
            return f"the {self.family} family file names no module for each branch"
        return None

    def check_surgery_allowed(self, config: PretrainedConfig) -> None:
        """Refuse checkpoints whose layers compute with their own index, which surgery would change."""
        for config_field, meaning in self.surgery_refused_when:
            if getattr(config, config_field, False):
                raise UsageError(f"{meaning} ({config_field}=True), so moving layers would change their maths; "
                                 "layer surgery is not possible for it")


def optional_submodule(model: nn.Module, path: str | None) -> nn.Module | None:
    """The submodule at ``path``, or None where the path is empty or the model holds nothing there."""
    if not path:
        return None
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return None
    module = getattr(parent, name, None)
    return module if isinstance(module, nn.Module) else None


@dataclass(frozen=True)
class FamilyDefinition:
    """One family file: the model types it covers, its adapter and its tiny test configs
    (test name -> config fields, read by :mod:`layerprune.models.tiny`)."""

    source: str
    model_types: tuple[str, ...]
    adapter: ArchitectureAdapter
    tiny: Mapping[str, Mapping[str, Any]]


_PATH_KEYS = ("family", "layers", "embeddings", "final_norm", "lm_head", "mlp_output", "input_norm")
_OPTIONAL_PATH_KEYS = ("head_projection", "pre_mlp_norm", "post_attention_norm", "post_mlp_norm", "sliding_flag",
                       "branch_multiplier")  # the last is a config field's name, checked the same way
_LIST_KEYS = ("attention_outputs", "mlp_inputs", "lora_targets", "per_layer_config")
_FLAG_KEYS = ("post_norm", "parallel_residual")
_MAPPING_KEYS = ("checkpoint_names", "surgery_refused_when")
_KNOWN_KEYS = {*_PATH_KEYS, *_OPTIONAL_PATH_KEYS, *_LIST_KEYS, *_FLAG_KEYS, *_MAPPING_KEYS,
               "model_types", "norm_kind", "logit_scaling", "tiny"}
_REQUIRED_KEYS = ("family", "model_types", "layers", "embeddings", "final_norm")


def parse_family(data: Any, source: str) -> FamilyDefinition:
    """Check one family file's content and turn it into a :class:`FamilyDefinition`.

    Every mistake names the file and the key, since a family file is written by hand.
    """

    def bad(problem: str) -> ValueError:
        return ValueError(f"family file {source}: {problem}")

    if not isinstance(data, dict):
        raise bad("must be a mapping of keys to values")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise bad(f"unknown keys {unknown}; the keys are {sorted(_KNOWN_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise bad(f"missing keys {missing}")
    fields: dict[str, Any] = {}
    for key in _PATH_KEYS:
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise bad(f"{key} must be a non-empty string, got {data[key]!r}")
            fields[key] = data[key]
    for key in _OPTIONAL_PATH_KEYS:
        if key in data:
            if data[key] is not None and (not isinstance(data[key], str) or not data[key]):
                raise bad(f"{key} must be a non-empty string or null, got {data[key]!r}")
            fields[key] = data[key]
    for key in _LIST_KEYS:
        if key in data:
            if not isinstance(data[key], list) or not all(isinstance(item, str) for item in data[key]):
                raise bad(f"{key} must be a list of strings, got {data[key]!r}")
            fields[key] = tuple(data[key])
    for key in _MAPPING_KEYS:
        if key in data:
            if not isinstance(data[key], dict) or not all(isinstance(v, str) for v in data[key].values()):
                raise bad(f"{key} must map names to strings, got {data[key]!r}")
            fields[key] = tuple((str(k), v) for k, v in data[key].items())
    if "norm_kind" in data:
        if data["norm_kind"] not in NORM_KINDS:
            raise bad(f"norm_kind must be one of {NORM_KINDS}, got {data['norm_kind']!r}")
        fields["norm_kind"] = data["norm_kind"]
    flags = []
    for key in _FLAG_KEYS:
        value = data.get(key, False)
        if isinstance(value, bool):
            fields[key] = value
        elif isinstance(value, dict) and set(value) <= {"config", "default", "negate"} and "config" in value:
            flag = ConfigFlag(str(value["config"]), bool(value.get("default", False)), bool(value.get("negate", False)))
            fields[key] = flag.default != flag.negate  # the value for a config that lacks the field
            flags.append((key, flag))
        else:
            raise bad(f"{key} must be true, false or {{config: FIELD, default: BOOL, negate: BOOL}}, got {value!r}")
    fields["config_flags"] = tuple(flags)
    steps = []
    for step in data.get("logit_scaling") or []:
        if not (isinstance(step, dict) and len(step) == 1 and next(iter(step)) in LogitStep.OPS):
            raise bad(f"each logit_scaling step must be one of {{{': FIELD}, {'.join(LogitStep.OPS)}: FIELD}}, "
                      f"got {step!r}")
        (op, config_field), = step.items()
        steps.append(LogitStep(op, str(config_field)))
    fields["logit_scaling"] = tuple(steps)
    model_types = data["model_types"]
    if not isinstance(model_types, list) or not model_types or not all(isinstance(t, str) for t in model_types):
        raise bad(f"model_types must be a non-empty list of strings, got {model_types!r}")
    tiny = data.get("tiny") or {}
    if not isinstance(tiny, dict) or not all(isinstance(c, dict) and "model_type" in c for c in tiny.values()):
        raise bad("tiny must map test names to configs, each with a model_type")
    return FamilyDefinition(source, tuple(model_types), ArchitectureAdapter(**fields), tiny)


def _read_family_files() -> tuple[FamilyDefinition, ...]:
    folder = resources.files("layerprune.models").joinpath("families")
    files = sorted((entry for entry in folder.iterdir() if entry.name.endswith(".yaml")), key=lambda e: e.name)
    return tuple(parse_family(yaml.safe_load(entry.read_text(encoding="utf-8")), entry.name) for entry in files)


def register_families(definitions: tuple[FamilyDefinition, ...]) -> Registry[ArchitectureAdapter]:
    """The adapters of ``definitions`` by model type; a model type claimed by two files is a mistake."""
    adapters: Registry[ArchitectureAdapter] = Registry("architecture")
    for definition in definitions:
        for model_type in definition.model_types:
            if model_type in adapters:
                raise ValueError(f"family file {definition.source}: model type {model_type!r} is already "
                                 "covered by another family file; list each model type in one file")
            adapters.register(model_type)(definition.adapter)
    return adapters


FAMILIES: tuple[FamilyDefinition, ...] = _read_family_files()
ADAPTERS: Registry[ArchitectureAdapter] = register_families(FAMILIES)


def supported_families() -> list[str]:
    return ADAPTERS.names()


_CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_ENCODER_ONLY = {"albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
                 "megatron-bert", "modernbert", "rembert", "roberta", "roberta-prelayernorm", "xlm-roberta", "xmod"}


def check_supported_config(config: PretrainedConfig) -> None:
    """Fail before loading weights if the checkpoint is not a decoder-only causal LM."""
    model_type = config.model_type
    if model_type in ADAPTERS or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return  # a registered family, or custom code (already trusted by the user) that declares a causal LM
    architectures = getattr(config, "architectures", None) or []
    declared_non_causal = architectures and not any(a.endswith(_CAUSAL_CLASS_SUFFIXES) for a in architectures)
    if (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or getattr(config, "is_encoder_decoder", False)
        or declared_non_causal
        or (model_type in _ENCODER_ONLY and not getattr(config, "is_decoder", False))
    ):
        raise UsageError(
            f"architecture {model_type!r} is not a causal (decoder-only) language model; layerprune "
            f"supports: {', '.join(supported_families())}"
        )


def adapter_for_config(config: PretrainedConfig) -> ArchitectureAdapter:
    """The registered adapter of ``config``'s family resolved against it (for code that has only
    the config, such as shard surgery); refuses an unregistered family."""
    return ADAPTERS.get(config.model_type).for_config(config)


def adapter_for(model: PreTrainedModel) -> ArchitectureAdapter:
    """The registered adapter for ``model``'s family, or an inferred one with a warning."""
    model_type = model.config.model_type
    if model_type in ADAPTERS:
        return ADAPTERS.get(model_type).for_config(model.config)
    adapter = infer_adapter(model)
    warnings.warn(
        f"architecture {model_type!r} has no registered adapter; using the decoder layers found at "
        f"{adapter.layers!r}. Supported families: {', '.join(supported_families())}",
        stacklevel=2,
    )
    return adapter


def infer_adapter(model: PreTrainedModel) -> ArchitectureAdapter:
    """Find the one ModuleList whose length equals the configured layer count."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if len(candidates) != 1 or embeddings is None or output is None:
        raise UsageError(
            f"architecture {model.config.model_type!r} is not supported and its decoder layers "
            f"could not be found automatically; supported: {', '.join(supported_families())}"
        )
    names = {module: name for name, module in model.named_modules()}
    layers = candidates[0]
    parent = layers.rpartition(".")[0]
    norms = [
        name for name, module in model.named_modules()
        if name.rpartition(".")[0] == parent and "norm" in type(module).__name__.lower()
    ]
    base = model.get_submodule(parent) if parent else model
    return ArchitectureAdapter(
        family=model.config.model_type, layers=layers, embeddings=names[embeddings],
        final_norm=norms[0] if norms else "", lm_head=names[output],
        sliding_flag="has_sliding_layers" if hasattr(base, "has_sliding_layers") else None, inferred=True,
    )
