"""layerprune: depth pruning for Hugging Face causal LMs.

Score layer importance, pick layers, cut or replace them, repair or heal, evaluate, and export a checkpoint
that loads anywhere transformers loads.
"""

from layerprune.api import info, prune, replace, save
from layerprune.data import build_calibration
from layerprune.errors import UsageError
from layerprune.evaluation import evaluate
from layerprune.healing import heal
from layerprune.models.loading import LoadedModel, load_model
from layerprune.recipes import run_recipe
from layerprune.repair import compensate
from layerprune.scoring import ScoreReport, score
from layerprune.search import search
from layerprune.selection import Selection, select

__all__ = ["LoadedModel", "ScoreReport", "Selection", "UsageError", "build_calibration", "compensate", "evaluate",
           "heal", "info", "load_model", "prune", "replace", "run_recipe", "save", "score", "search", "select"]
__version__ = "0.1.0"
