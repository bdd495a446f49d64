"""preflight.model_for_ranks: what a run on several devices refuses once, before any rank starts."""
import os

import pytest

from gitfast.checkpoint import loading
from gitfast.captioning import preflight


def test_the_longest_prompt_that_fits_passes_and_one_token_more_is_refused(checkpoint):
    folder = loading.resolve(checkpoint)
    config = loading.load_config(folder)
    tokenizer = loading.load_processor(folder).tokenizer
    word_tokens = len(tokenizer("red", add_special_tokens=False).input_ids)
    assert word_tokens == 1  # so that n words are n tokens
    new = 4
    fits = "red " * (config.max_position_embeddings - new - 1)  # [CLS] + the words + the new tokens
    assert preflight.model_for_ranks(checkpoint, fits, new) == str(folder)
    with pytest.raises(ValueError, match="exceeds the model's"):
        preflight.model_for_ranks(checkpoint, fits + "red", new)


def test_a_missing_model_is_refused_and_the_embedded_one_is_passed_as_none(tmp_path):
    with pytest.raises(loading.CheckpointError):
        preflight.model_for_ranks(str(tmp_path / "nothing"), None, 4)
    if os.path.isdir(str(preflight.EMBEDDED_MODEL)):
        assert preflight.model_for_ranks(None, None, 4) is None
