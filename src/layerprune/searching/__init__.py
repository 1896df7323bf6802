"""``layerprune search``: the best smaller model for a budget, with the Pareto front it came from.

:func:`search` is the entry point (``lp.search``; the package is named apart from it so the
function is what ``layerprune.search`` names); :class:`SearchConfig` declares its options;
:mod:`.candidates` builds what is ranked, :mod:`.ranking` ranks it on held-out text, :mod:`.speed`
measures decode speed-ups, :mod:`.report` writes the output folder, :mod:`.record` types ``search.json``.
"""

from layerprune.searching.candidates import Candidate, candidate_metrics
from layerprune.searching.config import SearchConfig
from layerprune.searching.ranking import DropRule, Ranked, rank
from layerprune.searching.record import SearchDocument
from layerprune.searching.search import SearchRecord, Tried, search

__all__ = ["Candidate", "DropRule", "Ranked", "SearchConfig", "SearchDocument", "SearchRecord", "Tried",
           "candidate_metrics", "rank", "search"]
