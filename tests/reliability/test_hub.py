"""Names that would reach the Hugging Face hub fail in seconds, with one line, when they cannot load."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.reliability.conftest import CliResult, assert_refused

Cli = Callable[..., CliResult]


def _no_hub_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("the hub was asked although the name could be refused before")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the hub at the discard port (refused at once) and fail any attempt to download."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("layerprune.models.checkpoint.AutoConfig.from_pretrained", _no_hub_download)


@pytest.mark.parametrize(("typo", "alias"), [("smolm2-135m", "smollm2-135m"), ("gemma-3-270m", "gemma3-270m"),
                                             ("smollm2-135M", "smollm2-135m")])
def test_a_near_miss_of_an_alias_suggests_it(cli: Cli, no_hub: None, typo: str, alias: str) -> None:
    assert_refused(cli("info", "--model", typo), f"did you mean {alias}?")


def test_an_unreachable_hub_fails_before_the_hub_libraries_retry(cli: Cli, no_hub: None) -> None:
    assert_refused(cli("info", "--model", "someorg/some-model"), "'someorg/some-model'", "hub cannot be reached",
                   "pass its folder")


def test_offline_mode_leaves_the_answer_to_the_local_cache(cli: Cli, no_hub: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE the user asked for their Hugging Face cache: no reachability check, and the
    loader is asked (here it refuses, which shows it was reached)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssertionError, match="the hub was asked"):
        cli("info", "--model", "someorg/some-model")
