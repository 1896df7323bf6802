"""Whether the Hugging Face hub can answer, decided in seconds.

transformers, ``datasets`` and lm-eval retry an unreachable hub for close to a minute and then end
in a traceback. Every place that would reach the hub (a hub model id, a hub corpus, lm-eval's
online tasks) asks here first, so an offline user gets one line at once.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

_TRUE = ("1", "true", "yes", "on")


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set: the user wants their local Hugging Face
    cache only, so the libraries are left to answer from it."""
    return any(os.environ.get(flag, "").lower() in _TRUE for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub's endpoint (``HF_ENDPOINT`` or huggingface.co) accepts a connection."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True
