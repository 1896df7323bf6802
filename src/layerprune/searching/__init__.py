"""``layerprune search``: the best smaller model for a budget, with the Pareto front it came from.

:func:`search` is the entry point; :mod:`.candidates` builds what is ranked, :mod:`.ranking`
ranks it on held-out text, :mod:`.speed` measures decode speed-ups, :mod:`.report` writes the
output folder.
"""

from layerprune.searching.candidates import Candidate, candidate_metrics
from layerprune.searching.ranking import DropRule, Ranked, rank
from layerprune.searching.search import SearchRecord, Tried, check_budget, search

__all__ = ["Candidate", "DropRule", "Ranked", "SearchRecord", "Tried", "candidate_metrics", "check_budget", "rank",
           "search"]
