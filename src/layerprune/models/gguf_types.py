"""The GGUF tensor types layerprune writes: one table for the export option's check and the writer.

Apart from :mod:`layerprune.models.gguf_file` so that :class:`~layerprune.models.export.ExportConfig`
can refuse a ``gguf_type`` when it is built, before any model is loaded, without importing the writer.
"""

from __future__ import annotations

import gguf

from layerprune.errors import OptionError

WRITABLE_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
"""The tensor types the ``gguf`` package can write (``gguf.quants.quantize``); K-quants and i-quants
it can only read, so a changed tensor of a Q4_K_M file is written as Q8_0 unless told otherwise."""


def quant_type(name: str) -> gguf.GGMLQuantizationType:
    """The writable GGUF tensor type called ``name``, refused with the choices if it is unknown or one
    that the ``gguf`` package cannot write."""
    known = gguf.GGMLQuantizationType.__members__
    if name.upper() not in known:
        raise OptionError.about("gguf_type", f"{name!r} is not a GGUF tensor type; use one of {', '.join(WRITABLE_TYPES)}")
    if name.upper() not in WRITABLE_TYPES:
        raise OptionError.about("gguf_type", f"{name} is a type the gguf package reads but cannot write; use one of "
                                             f"{', '.join(WRITABLE_TYPES)}")
    return known[name.upper()]
