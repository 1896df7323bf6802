"""Fine-tuning the first k layers for classification, on a tiny model and a learnable task."""

from __future__ import annotations

import pytest

from layerprune.errors import UsageError
from layerprune.evaluation.classification import ClassificationSettings, classification_curve, verbalizer_token_ids
from layerprune.models.tiny import byte_tokenizer
from tests.evaluation.conftest import letters_task
from tests.helpers import tiny_loaded

SETTINGS = ClassificationSettings(ks=(1, 3), train_size=96, test_size=64, epochs=3, batch_size=16, lr=3e-3,
                                  max_tokens=24)


def test_both_read_outs_learn_above_chance_at_every_depth() -> None:
    loaded = tiny_loaded(num_layers=3)
    curve = classification_curve(loaded, letters_task(96, seed=0), letters_task(64, seed=1), SETTINGS)
    assert curve["train_examples"] == 96 and curve["test_examples"] == 64
    assert 0.5 <= curve["chance"] < 0.7
    for kind in ("verbalizer", "head"):
        assert set(curve["accuracy"][kind]) == {"1", "3"}
        for accuracy in curve["accuracy"][kind].values():
            assert accuracy >= curve["chance"] + 0.2, curve["accuracy"]


def test_the_original_model_is_not_modified() -> None:
    loaded = tiny_loaded(num_layers=3)
    before = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    classification_curve(loaded, letters_task(16, 0), letters_task(8, 1),
                         ClassificationSettings(ks=(2,), heads=("head",), train_size=16, test_size=8, epochs=1))
    assert loaded.num_layers == 3
    assert all((before[name] == tensor).all() for name, tensor in loaded.model.state_dict().items())


def test_verbalizer_words_get_distinct_first_tokens() -> None:
    tokenizer = byte_tokenizer()
    ids = verbalizer_token_ids(tokenizer, ["low", "high"])  # " low"/" high" share the space byte
    assert ids == [tokenizer.convert_tokens_to_ids("l"), tokenizer.convert_tokens_to_ids("h")]
    with pytest.raises(UsageError, match="same token"):
        verbalizer_token_ids(tokenizer, ["positive", "pos"])


def test_bad_settings_fail_before_training() -> None:
    loaded = tiny_loaded(num_layers=3)
    data = letters_task(8, 0)
    with pytest.raises(UsageError, match="between 1 and 3"):
        classification_curve(loaded, data, data, ClassificationSettings(ks=(1, 4)))
    with pytest.raises(UsageError, match="unknown classification head"):
        ClassificationSettings(ks=(1,), heads=("mlp",)).check()
    with pytest.raises(UsageError, match="one word per class"):
        classification_curve(loaded, data, data, ClassificationSettings(ks=(1,), verbalizer=("a", "b", "c")))
