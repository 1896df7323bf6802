"""Reference implementations the tests compare layerprune against, and the one tiny-model factory they share."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from layerprune.models.architectures import adapter_for
from layerprune.models.loading import LoadedModel
from layerprune.models.tiny import byte_tokenizer, tiny_model
from layerprune.searching.fitness import TopK, kl_top_k


@contextmanager
def skipping_layers(layers: nn.ModuleList, skip: Iterable[int]) -> Iterator[None]:
    """Make the given layers pass their input through unchanged (the textbook meaning of
    'removing' a residual block), without touching the model's structure."""

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if not isinstance(output, tuple) else (hidden, *output[1:])

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skip]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tiny_loaded(family: str = "llama", num_layers: int = 6, *, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The tiny random ``family`` model as a :class:`LoadedModel` with the byte tokenizer: the one
    in-memory tiny-model factory of the test suite."""
    model = tiny_model(family, num_layers, seed=seed).to(dtype)
    return LoadedModel(model, byte_tokenizer(), f"tiny-{family}", adapter_for(model))


def save_tiny_checkpoint(folder: Path, family: str = "llama", num_layers: int = 6, *,
                         max_shard_size: str = "2GB") -> Path:
    """Write a tiny random model of ``family`` and the byte tokenizer to ``folder`` as transformers
    writes a checkpoint (sharded when ``max_shard_size`` is small): the one on-disk factory."""
    tiny_model(family, num_layers).save_pretrained(folder, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(folder)
    return folder


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def record_text(name: str) -> str:
    """A record layerprune wrote (``layerprune-before-format-version.json``, a pruned model's lineage;
    ``search.json``, a tiny search's), kept in tests/fixtures: what marks a folder as layerprune's output."""
    return (FIXTURES / name).read_text()


def write_corpus(path: Path, documents: int = 200) -> Path:
    """A small plain-text corpus (blank-line separated notes) for calibration, healing and evaluation."""
    path.write_text("\n\n".join(f"Note {i}: the value {i * 7} follows {i}." for i in range(documents)))
    return path


def script_module(path: Path, name: str) -> ModuleType:
    """A script (a benchmark, a docs generator) imported as the module ``name``, registered in
    ``sys.modules`` (a dataclass in it looks its module up there), so a test can call its functions
    and replace its globals."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"{path} is no Python file"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def search_folder(folder: Path, loaded: LoadedModel) -> dict[str, Path]:
    """A constructed model saved in ``folder`` with a calibration corpus and held-out text of another
    form (what a search ranks on), for the search tests: paths by name."""
    import layerprune as lp

    lp.save(loaded, folder / "model")
    held_out = folder / "held-out.txt"
    held_out.write_text("\n\n".join(f"Entry {i}: {i * 3} comes after {i}, before {i + 1}." for i in range(300)))
    return {"model": folder / "model", "calibration": write_corpus(folder / "calibration.txt"),
            "held_out": held_out, "folder": folder}


def bos_tokenizer(starts: int = 1) -> PreTrainedTokenizerFast:
    """The tiny models' byte tokenizer, made to start every text with ``starts`` times ``<s>``
    (id 257), the way Gemma's and Llama's tokenizers start it with one ``<bos>``."""
    from tokenizers import processors

    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> " * starts + "$A", special_tokens=[("<s>", 257)])
    return tokenizer


def dead_pid() -> int:
    """The id of a process that has just exited: what a ``kill -9``-ed run leaves in its staging names."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@contextmanager
def zeroing_branches(model: nn.Module, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> Iterator[None]:
    """Make the attention of layers ``attention`` and the MLP of layers ``mlp`` add nothing, by zeroing
    their output projections' outputs with hooks (the textbook meaning of removing a branch), without
    touching the model's structure."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)

    def zero(module, args, output):
        return torch.zeros_like(output)

    targets = [layers[i].get_submodule(adapter.attention_outputs[0]) for i in attention]
    targets += [layers[i].get_submodule(adapter.mlp_output) for i in mlp]
    handles = [target.register_forward_hook(zero) for target in targets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


KL_FLOAT32_NOISE = 1e-5
"""How far a float32 top-k KL summed over a tiny batch (~120 positions) may sit from its float64 reference:
log-probabilities of about 5 nats differ in the 7th digit, and a KL sums their differences weighted by p.
It is 0.1% of the smallest KL the fitness tests read, so a wrong cut still fails them."""


def reference_top_k_kl(original_log_probs: torch.Tensor, candidate_log_probs: torch.Tensor) -> float:
    """The summed top-k KL(original || candidate) of full log-probabilities ``[n, vocab]``, in float64."""
    return float(kl_top_k(TopK.of(original_log_probs.double()), candidate_log_probs.double()).sum())
