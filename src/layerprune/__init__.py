"""layerprune: depth pruning for Hugging Face causal LMs.

Score layer importance, pick layers, cut or replace them, repair or heal, evaluate, and export a checkpoint
that loads anywhere transformers loads.

The public names are imported on first use (PEP 562), not with the package: ``import layerprune``
(and the ``layerprune`` command, which imports the package before it can catch anything) then
costs milliseconds instead of torch's and transformers' import, so a Ctrl-C while the command
starts is caught by the command and not shown as a traceback.
"""

import importlib as _importlib
import typing as _typing

# public name -> the module that defines it
_EXPORTS = {
    "info": "layerprune.api", "prune": "layerprune.api", "replace": "layerprune.api", "save": "layerprune.api",
    "build_calibration": "layerprune.data", "UsageError": "layerprune.errors", "evaluate": "layerprune.evaluation",
    "heal": "layerprune.healing", "LoadedModel": "layerprune.models.loading", "load_model": "layerprune.models.loading",
    "run_recipe": "layerprune.recipes", "compensate": "layerprune.repair", "ScoreReport": "layerprune.scoring", "score": "layerprune.scoring",
    "search": "layerprune.searching", "Selection": "layerprune.selection", "select": "layerprune.selection",
}

if _typing.TYPE_CHECKING:
    from layerprune.api import info, prune, replace, save
    from layerprune.data import build_calibration
    from layerprune.errors import UsageError
    from layerprune.evaluation import evaluate
    from layerprune.healing import heal
    from layerprune.models.loading import LoadedModel, load_model
    from layerprune.recipes import run_recipe
    from layerprune.repair import compensate
    from layerprune.scoring import ScoreReport, score
    from layerprune.searching import search
    from layerprune.selection import Selection, select

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> _typing.Any:
    """Import a public name the first time it is read, and keep it."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'layerprune' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API (``__all__``) and the version: not the helpers this module imports, nor the
    subpackages, which are reached by their own names."""
    return sorted({*__all__, "__version__"})

