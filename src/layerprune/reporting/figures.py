"""How every figure layerprune draws becomes PNG bytes: one place for the settings they share."""

from __future__ import annotations

import io
from typing import Any

from layerprune.outputs import PNG_SOFTWARE


def png_bytes(figure: Any, dpi: int) -> bytes:
    """``figure`` as PNG bytes, closed afterwards. The PNG's ``Software`` text is layerprune's, so a
    later run recognises the file as its own output (and never replaces a picture of the user's)."""
    import matplotlib.pyplot as plt  # deferred: matplotlib (~0.3 s) only when a figure is drawn

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": PNG_SOFTWARE})
    plt.close(figure)
    return buffer.getvalue()
