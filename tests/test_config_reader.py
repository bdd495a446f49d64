"""Issue #25 item 1: config.json read without transformers (gitfast/checkpoint/config_reader.py) gives what
transformers' GitConfig gives — its defaults where the file is silent, its refusals where a value has a
type it does not take — on many files, and through loading.read_config as loading.load_config."""
import dataclasses
import json

import pytest
from transformers import GitConfig, PreTrainedConfig
from transformers.models.git.configuration_git import GitVisionConfig

from gitfast.checkpoint import config_reader, loading
from gitfast.checkpoint.config_reader import ConfigTypeError, GitSettings, VisionSettings, git_settings
from gitfast.defaults import EMBEDDED_MODEL
from gitfast.devices import resolve_dtype

EMBEDDED = json.loads((EMBEDDED_MODEL / "config.json").read_text())
NO_VISION = {k: v for k, v in EMBEDDED.items() if k != "vision_config"}

VARIANTS = {
    "embedded": EMBEDDED,
    "only model_type": {"model_type": "git"},
    "no vision_config": NO_VISION,
    "vision_config null": {**NO_VISION, "vision_config": None},
    "vision_config partial": {**NO_VISION, "vision_config": {"image_size": 96, "patch_size": 8}},
    "vision image_size list": {**EMBEDDED, "vision_config": {**EMBEDDED["vision_config"], "image_size": [80, 80]}},
    "eos list, pad null": {**EMBEDDED, "eos_token_id": [3, 4], "pad_token_id": None, "bos_token_id": None},
    "video": {**EMBEDDED, "num_image_with_embedding": 6},
    "tied, no cache": {**EMBEDDED, "tie_word_embeddings": True, "use_cache": False},
    "torch_dtype": {**NO_VISION, "torch_dtype": "bfloat16"},
    "dtype": {**EMBEDDED, "dtype": "float16"},
    "extra keys": {**EMBEDDED, "foo": [1, 2], "architectures": ["GitForCausalLM"], "hidden_dropout_prob": 0},
    "git-base-like": {"model_type": "git", "architectures": ["GitForCausalLM"], "hidden_act": "gelu",
                      "initializer_range": 0.02, "layer_norm_eps": 1e-12, "torch_dtype": "float32",
                      "vision_config": {"dropout": 0.0, "model_type": "clip_vision_model", "projection_dim": 512}},
}


def fields_of(settings, cls):
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_values_equal_gitconfig(name):
    raw = VARIANTS[name]
    ours, theirs = git_settings(dict(raw)), GitConfig.from_dict(dict(raw))
    for field, value in fields_of(ours, GitSettings).items():
        if field in ("vision_config", "raw", "dtype"):
            continue
        assert value == getattr(theirs, field), field
    for field, value in fields_of(ours.vision_config, VisionSettings).items():
        assert value == getattr(theirs.vision_config, field), f"vision_config.{field}"
    assert resolve_dtype("auto", ours) == resolve_dtype("auto", theirs)


WRONG = ["12", True, 1.5, None, [1], {"a": 1}, 0.0, 3]


def _gitconfig_refuses(raw) -> bool:
    try:
        GitConfig.from_dict(raw)
    except Exception:  # huggingface_hub's StrictDataclassFieldValidationError, ValueError, TypeError
        return True
    return False


@pytest.mark.parametrize("where", ["text", "vision"])
def test_wrong_types_are_refused_exactly_where_gitconfig_refuses_them(where):
    schema = config_reader.TEXT_FIELDS if where == "text" else config_reader.VISION_FIELDS
    checked = 0
    for field in schema:
        for value in WRONG:
            if where == "text":
                raw = {**EMBEDDED, field: value}
            else:
                raw = {**EMBEDDED, "vision_config": {**EMBEDDED["vision_config"], field: value}}
            try:
                git_settings(json.loads(json.dumps(raw)))
                ours = False
            except ConfigTypeError:
                ours = True
            assert ours == _gitconfig_refuses(json.loads(json.dumps(raw))), (where, field, value)
            checked += ours
    assert checked > len(schema)  # most wrong values are refused, so the comparison is not vacuous


def test_the_schema_covers_every_field_gitconfig_declares():
    shared = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    text = {f.name for f in dataclasses.fields(GitConfig)} - shared - {"vision_config"}
    vision = {f.name for f in dataclasses.fields(GitVisionConfig)} - shared
    assert set(config_reader.TEXT_FIELDS) == text
    assert set(config_reader.VISION_FIELDS) == vision
    for name, (default, _) in config_reader.TEXT_FIELDS.items():
        assert default == getattr(GitConfig(), name), name
    for name, (default, _) in config_reader.VISION_FIELDS.items():
        assert default == getattr(GitVisionConfig(), name), name


def write(tmp_path, raw):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("raw, words", [
    ({**EMBEDDED, "layer_norm_eps": "1e-5"}, "layer_norm_eps"),
    ({**EMBEDDED, "vision_config": [1]}, "vision_config"),
    ({**EMBEDDED, "num_attention_heads": 3}, "num_attention_heads 3 does not divide hidden_size 128"),
    ({**EMBEDDED, "model_type": "bert"}, "not GIT"),
    ([1, 2], "not GIT"),
])
def test_read_config_refuses_what_load_config_refuses(tmp_path, raw, words):
    folder = write(tmp_path, raw)
    for reader in (loading.read_config, loading.load_config):
        with pytest.raises(loading.CheckpointError, match="config.json|not GIT") as caught:
            reader(folder)
        if reader is loading.read_config:
            assert words in str(caught.value)


def test_read_config_then_save_pretrained_writes_transformers_config(tmp_path):
    ours = loading.read_config(EMBEDDED_MODEL)
    ours.save_pretrained(tmp_path)
    again = GitConfig.from_pretrained(str(tmp_path))
    assert again.to_dict() == loading.load_config(EMBEDDED_MODEL).to_dict()


def test_what_gitconfig_has_beyond_the_read_fields_comes_from_gitconfig():
    ours, theirs = loading.read_config(EMBEDDED_MODEL), loading.load_config(EMBEDDED_MODEL)
    assert ours.to_dict() == theirs.to_dict() and ours.model_type == "git"
    assert ours.initializer_range == theirs.initializer_range
    with pytest.raises(AttributeError):
        ours.no_such_field


def test_reading_the_dtype_of_a_config_without_one_needs_no_gitconfig():
    ours = git_settings({"model_type": "git"})
    assert resolve_dtype("auto", ours).is_floating_point and "_git_config" not in vars(ours)
