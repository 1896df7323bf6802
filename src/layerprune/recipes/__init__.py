"""YAML recipes that replay a whole pruning run: load, score, select, prune, heal, evaluate."""

from layerprune.recipes.runner import STAGES, Recipe, load_recipe, run_recipe

__all__ = ["STAGES", "Recipe", "load_recipe", "run_recipe"]
