"""A GIT checkpoint's config.json, read without importing transformers.

Importing transformers costs about a second of start-up (and `GitConfig.from_pretrained` scans the
model files of every architecture), while the Captioner and the CLI need only the dozen sizes, ids and
names below. `GitSettings` holds exactly those, with `transformers.GitConfig`'s defaults where the file
is silent and its refusals where a value has the wrong type (tests/test_config_reader.py compares the
two on many files). The drop-in keeps transformers' `GitConfig` (`loading.load_config`): a user may
touch anything on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value) -> bool:
    return isinstance(value, float)


def _is_number(value) -> bool:
    return _is_int(value) or _is_float(value)


def _optional(check):
    return lambda value: value is None or check(value)


def _int_or_ints(value) -> bool:
    return _is_int(value) or (isinstance(value, (list, tuple)) and all(map(_is_int, value)))


# GitConfig's own fields (transformers' models.git.configuration_git): default, and the type check of its
# strict dataclass. The dropout and initializer fields are only checked: gitfast does not read them.
TEXT_FIELDS = {
    "vocab_size": (30522, _is_int), "hidden_size": (768, _is_int), "num_hidden_layers": (6, _is_int),
    "num_attention_heads": (12, _is_int), "intermediate_size": (3072, _is_int),
    "hidden_act": ("gelu", lambda v: isinstance(v, str)), "hidden_dropout_prob": (0.1, _is_number),
    "attention_probs_dropout_prob": (0.1, _is_number), "max_position_embeddings": (1024, _is_int),
    "initializer_range": (0.02, _is_float), "layer_norm_eps": (1e-12, _is_float),
    "pad_token_id": (0, _optional(_is_int)), "use_cache": (True, lambda v: isinstance(v, bool)),
    "tie_word_embeddings": (False, lambda v: isinstance(v, bool)), "bos_token_id": (101, _optional(_is_int)),
    "eos_token_id": (102, _optional(lambda v: _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))))),
    "num_image_with_embedding": (None, _optional(_is_int)),
}
# GitVisionConfig's
VISION_FIELDS = {
    "hidden_size": (768, _is_int), "intermediate_size": (3072, _is_int), "num_hidden_layers": (12, _is_int),
    "num_attention_heads": (12, _is_int), "num_channels": (3, _is_int), "image_size": (224, _int_or_ints),
    "patch_size": (16, _int_or_ints), "hidden_act": ("quick_gelu", lambda v: isinstance(v, str)),
    "layer_norm_eps": (1e-5, _is_float), "attention_dropout": (0.0, _is_number), "initializer_range": (0.02, _is_float),
}


class ConfigTypeError(ValueError):
    """A field of config.json holds a value of a type GitConfig refuses."""


@dataclass
class VisionSettings:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: Any  # GitVisionConfig also takes a list; loading.check_config refuses anything but a count
    patch_size: Any
    hidden_act: str
    layer_norm_eps: float


@dataclass
class GitSettings:
    """What gitfast's model, engine and Captioner read of config.json, as attributes named as on GitConfig."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    layer_norm_eps: float
    pad_token_id: Optional[int]
    bos_token_id: Optional[int]
    eos_token_id: Union[int, list, None]
    num_image_with_embedding: Optional[int]
    use_cache: bool
    tie_word_embeddings: bool
    vision_config: VisionSettings
    dtype: Optional[str] = None          # the saved dtype's name (`devices.resolve_dtype("auto", ...)`)
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # config.json as read

    def to_git_config(self):
        """transformers' `GitConfig` of the same file (imports transformers)."""
        from transformers import GitConfig

        return GitConfig.from_dict(dict(self.raw))

    @property
    def torch_dtype(self) -> Optional[str]:  # transformers' older name, read by devices.resolve_dtype
        return self.dtype

    def __getattr__(self, name):
        # anything else a GitConfig has (to_dict, model_type, ...) is read from one, built on first use
        if name.startswith("_"):
            raise AttributeError(name)
        if "_git_config" not in self.__dict__:
            self.__dict__["_git_config"] = self.to_git_config()
        return getattr(self.__dict__["_git_config"], name)

    def save_pretrained(self, directory) -> None:
        """config.json as transformers writes it (`GitModel.save_pretrained` calls this)."""
        self.to_git_config().save_pretrained(str(directory))


def git_settings(raw: dict) -> GitSettings:
    """`GitSettings` from config.json's object; `ConfigTypeError` naming a field GitConfig would refuse.
    The fields every transformers config shares (architectures, id2label, ...) are not read nor checked."""
    vision = raw.get("vision_config")
    if vision is None:
        vision = {}
    if not isinstance(vision, dict):
        raise ConfigTypeError(f"vision_config is {vision!r}; it must be an object")
    text = _read(raw, TEXT_FIELDS, GitSettings, "")
    text["vision_config"] = VisionSettings(**_read(vision, VISION_FIELDS, VisionSettings, "vision_config."))
    saved = raw.get("dtype") or raw.get("torch_dtype")
    return GitSettings(**text, dtype=saved if isinstance(saved, str) else None, raw=raw)


def _read(given: dict, schema: dict, cls, prefix: str) -> dict:
    """Every field of `schema` checked (the file's value, else the default); those `cls` holds, returned."""
    kept = {f.name for f in fields(cls)}
    values = {}
    for name, (default, type_ok) in schema.items():
        value = given.get(name, default)
        if not type_ok(value):
            raise ConfigTypeError(f"{prefix}{name} is {value!r}, of a type GitConfig does not take")
        if name in kept:
            values[name] = value
    return values
