"""Issue #25 item 1: the Captioner's generation config without transformers (gitfast/checkpoint/plain_generation.py)
resolves to the same generation settings, and refuses the same calls, as transformers' GenerationConfig
read from the same generation_config.json."""
import json

import pytest
from transformers import GenerationConfig

from gitfast.checkpoint import loading, plain_generation
from gitfast.defaults import EMBEDDED_MODEL
from gitfast.checkpoint.plain_generation import FIELDS, PlainGenerationConfig
from gitfast.serving.generation import SUPPORTED, resolve_settings

CALLS = [
    {"max_new_tokens": 20},
    {"max_new_tokens": 5, "num_beams": 3, "do_sample": False},
    {"max_new_tokens": 7, "num_beams": 4, "length_penalty": 0.5, "early_stopping": "never"},
    {"max_new_tokens": 7, "num_beams": 2, "early_stopping": True, "num_return_sequences": 2},
    {"max_new_tokens": 9, "do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9},
    {"max_new_tokens": 9, "min_new_tokens": 3, "repetition_penalty": 1.3, "eos_token_id": [3, 7]},
    {"max_length": 12, "min_length": 4, "pad_token_id": 1, "eos_token_id": None},
    {"max_new_tokens": 4, "return_dict_in_generate": True, "output_scores": True, "output_logits": True},
    {"max_new_tokens": 4, "no_repeat_ngram_size": 2},            # a transformers field outside FIELDS
    {"max_new_tokens": 4, "do_sample": True, "num_return_sequences": 3, "top_k": None},
]
REFUSED = [
    ({"max_new_tokens": 0}, ValueError),
    ({"early_stopping": "sometimes"}, ValueError),
    ({"num_return_sequences": 2}, ValueError),
    ({"num_beams": 2, "num_return_sequences": 3}, ValueError),
    ({"max_new_tokens": 3, "foo": 1}, TypeError),
    ({"max_new_tokens": 3, "guidance_scale": 2.0}, NotImplementedError),
    ({"max_new_tokens": 3, "cache_implementation": "nonsense"}, ValueError),
    ({"max_new_tokens": 3, "logits_processor": []}, TypeError),
]


def both():
    ours = plain_generation.read(EMBEDDED_MODEL, lambda folder: pytest.fail("fell back to transformers"))
    assert isinstance(ours, PlainGenerationConfig)
    return ours, GenerationConfig.from_pretrained(str(EMBEDDED_MODEL))


def test_fields_are_transformers_fields_with_none_defaults_and_gitfasts_supported_set():
    defaults = vars(GenerationConfig())
    assert set(FIELDS) == SUPPORTED
    assert all(name in defaults and defaults[name] is None for name in FIELDS)
    # every field defaults to None: what PlainGenerationConfig.to_diff_dict relies on
    assert all(v is None for k, v in defaults.items() if not k.startswith("_"))


def test_read_values_equal_transformers():
    ours, theirs = both()
    for name in FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    diff = {k: v for k, v in theirs.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"}
    assert ours.to_diff_dict() == diff


@pytest.mark.parametrize("call", CALLS, ids=lambda c: ",".join(c))
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_settings_equal_transformers(call, prompt_len):
    ours, theirs = both()
    assert resolve_settings(ours, prompt_len, **call) == resolve_settings(theirs, prompt_len, **call)


@pytest.mark.parametrize("call, error", REFUSED, ids=lambda c: ",".join(c) if isinstance(c, dict) else "")
def test_refusals_equal_transformers(call, error):
    for config in both():
        with pytest.raises(error):
            resolve_settings(config, 1, **call)


def test_a_file_with_other_fields_is_left_to_transformers(tmp_path):
    (tmp_path / "config.json").write_text((EMBEDDED_MODEL / "config.json").read_text())
    config = loading.read_config(tmp_path)
    assert isinstance(loading.read_generation_config(tmp_path, config), PlainGenerationConfig)  # no file
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "no_repeat_ngram_size": 2}))
    got = loading.read_generation_config(tmp_path, config)
    assert isinstance(got, GenerationConfig) and got.no_repeat_ngram_size == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "num_beams": 2,
                                                                 "transformers_version": "5.0.0"}))
    got = loading.read_generation_config(tmp_path, config)
    assert isinstance(got, PlainGenerationConfig) and (got.eos_token_id, got.num_beams) == (3, 2)


def test_an_invalid_file_is_refused_as_transformers_refuses_it(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"early_stopping": "x"}))
    with pytest.raises(ValueError):
        GenerationConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError):
        plain_generation.read(tmp_path, lambda folder: pytest.fail("fell back"))


def test_save_pretrained_writes_what_transformers_reads(tmp_path):
    ours, theirs = both()
    ours.save_pretrained(tmp_path)
    again = GenerationConfig.from_pretrained(str(tmp_path))
    settings = [name for name in vars(theirs) if not name.startswith("_") and name != "transformers_version"]
    assert [getattr(again, name) for name in settings] == [getattr(theirs, name) for name in settings]


# config.json variants of a checkpoint without generation_config.json (as the microsoft/git-* ones are)
MODEL_CONFIGS = [
    {},
    {"bos_token_id": 5, "eos_token_id": 7, "pad_token_id": 1},
    {"eos_token_id": [102, 3], "pad_token_id": None},
    {"use_cache": False},
    {"output_attentions": True},
    {"output_hidden_states": True, "decoder_start_token_id": 4},
    {"classifier_dropout": None, "position_embedding_type": "absolute", "torch_dtype": "float32",
     "_name_or_path": "microsoft/git-base"},                    # keys the hub's GIT configs carry
]


def _checkpoint_without_generation_config(folder, changes):
    raw = json.loads((EMBEDDED_MODEL / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("changes", MODEL_CONFIGS, ids=lambda c: ",".join(c) or "as is")
def test_no_file_reads_as_transformers_reads_the_model_config(tmp_path, changes):
    folder = _checkpoint_without_generation_config(tmp_path, changes)
    ours = plain_generation.read(folder, lambda folder: pytest.fail("fell back to transformers"))
    theirs = loading.generation_config_of(folder, loading.load_config(folder))
    diff = {k: v for k, v in theirs.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"}
    assert ours.to_diff_dict() == diff
    for call in CALLS[:7]:
        assert resolve_settings(ours, 3, **call) == resolve_settings(theirs, 3, **call), call


def test_no_file_and_a_model_config_key_not_known_here_is_left_to_transformers(tmp_path):
    folder = _checkpoint_without_generation_config(tmp_path, {"max_length": 50})  # a legacy generation key
    got = plain_generation.read(folder, lambda folder: "transformers")
    assert got == "transformers"
