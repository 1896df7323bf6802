"""Fixtures of the data-layer tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> None:
    """Token caches of throwaway files go to a throwaway folder, not the shared cache.

    Only for tests of local files: built-in corpora need the shared cache, or they would be fetched again.
    """
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def hub_reachable(monkeypatch) -> None:
    """Tests of hub names use a fake ``datasets``: pretend the hub answers, without touching the network."""
    monkeypatch.setattr("layerprune.hub.hub_reachable", lambda timeout=5.0: True)
