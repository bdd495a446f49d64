"""A checkpoint's generation_config.json as the Captioner uses it, without importing transformers.

`serving.generation.resolve_settings` reads a generation config through a small surface: attributes,
`update(**kwargs)` (returns the keywords that are no field), `to_diff_dict()` and a default instance of
the same class. `PlainGenerationConfig` offers that surface for the fields gitfast implements
(`FIELDS`); every field of transformers' `GenerationConfig` defaults to None, so "changed" is "set".
A file or a keyword naming any other field is left to transformers: `read` then returns transformers'
`GenerationConfig`, and `update` asks transformers whether the name is a field and checks the result with
its `validate` — the rare path pays the import, the common one does not. transformers' advisory
warnings (a sampling flag without `do_sample`, ...) are not repeated on the plain path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .config_reader import TEXT_FIELDS

# the fields serving.generation.SUPPORTED names; the plain path reproduces their checks in `validate`
FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "early_stopping", "eos_token_id", "pad_token_id",
    "bos_token_id", "num_return_sequences", "use_cache", "return_dict_in_generate", "output_scores",
    "decoder_start_token_id", "output_attentions", "output_hidden_states", "output_logits",
)
# keys transformers writes into generation_config.json that are no generation setting
_METADATA = ("transformers_version", "_from_model_config")
FILE = "generation_config.json"


class PlainGenerationConfig:
    """The `FIELDS` of a generation config (None where unset), plus any other transformers field set
    through `update` (checked by transformers)."""

    def __init__(self, **values):
        for name in FIELDS:
            setattr(self, name, None)
        self._others = set()  # names of transformers fields outside FIELDS that were set
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise TypeError(f"PlainGenerationConfig takes only {FIELDS}, not {sorted(unknown)}")
        for name, value in values.items():
            setattr(self, name, value)
        self.validate()

    def update(self, **kwargs) -> dict:
        """Sets the keywords that name fields, as `GenerationConfig.update` does; returns the others."""
        used = [k for k in kwargs if k in FIELDS or _is_transformers_field(k)]  # transformers asked only off FIELDS
        for name in used:
            setattr(self, name, kwargs[name])
            if name not in FIELDS:
                self._others.add(name)
        self.validate()
        return {k: v for k, v in kwargs.items() if k not in used}

    def to_diff_dict(self) -> dict:
        """The fields set away from the default (None), as `GenerationConfig.to_diff_dict`."""
        names = list(FIELDS) + sorted(self._others)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def validate(self) -> None:
        """`GenerationConfig.validate`'s refusals for FIELDS; transformers' own with other fields set."""
        if self._others:
            self.to_transformers().validate()
            return
        if self.early_stopping not in {None, True, False, "never"}:
            raise ValueError(f"`early_stopping` must be a boolean or 'never', but is {self.early_stopping}.")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {self.max_new_tokens}.")
        returned = self.num_return_sequences
        if returned is not None and returned > 1:
            if self.num_beams is None or self.num_beams == 1:
                if not self.do_sample:
                    raise ValueError("Greedy methods (do_sample != True) without beam search do not support "
                                     f"`num_return_sequences` different than 1 (got {returned}).")
            elif returned > self.num_beams:
                raise ValueError(f"`num_return_sequences` ({returned}) has to be smaller or equal to `num_beams` "
                                 f"({self.num_beams}).")

    def to_transformers(self):
        """transformers' `GenerationConfig` with the same settings (imports transformers)."""
        from transformers import GenerationConfig

        return GenerationConfig(**self.to_diff_dict())

    def save_pretrained(self, directory) -> None:
        self.to_transformers().save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"PlainGenerationConfig({self.to_diff_dict()})"


def read(folder: Path, model_config_reader) -> object:
    """The generation config of the checkpoint in `folder`: a `PlainGenerationConfig` where
    generation_config.json names only FIELDS, else what `model_config_reader(folder)` gives
    (transformers' `GenerationConfig`: `loading.generation_config_of`)."""
    path = Path(folder) / FILE
    values = _plain_values(path) if path.is_file() else _from_model_config(Path(folder) / "config.json")
    if values is None:
        return model_config_reader(folder)
    return PlainGenerationConfig(**values)


def _plain_values(path: Path) -> Optional[dict]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # transformers' reader words the error
    if not isinstance(values, dict) or not set(values) <= set(FIELDS) | set(_METADATA):
        return None
    return {k: v for k, v in values.items() if k not in _METADATA}


# Without generation_config.json (GIT checkpoints published before transformers wrote one, such as the
# microsoft/git-* ones), transformers' `GenerationConfig.from_model_config` takes every generation field
# the model config holds. For a GIT config those are these, with the model config's own defaults
# (GitConfig's, as config_reader knows them; PreTrainedConfig's output flags); a value None is left out,
# as transformers leaves it out.
_FROM_MODEL_CONFIG = {
    **{name: TEXT_FIELDS[name][0] for name in ("use_cache", "pad_token_id", "bos_token_id", "eos_token_id")},
    "output_attentions": False, "output_hidden_states": False, "decoder_start_token_id": None,
}
# config.json keys known to hold no generation setting: any other key sends the read to transformers
_MODEL_ONLY = (set(TEXT_FIELDS) - set(_FROM_MODEL_CONFIG)) | {
    "vision_config", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "classifier_dropout", "position_embedding_type",
}


def _from_model_config(config_file: Path) -> Optional[dict]:
    """What transformers' `from_model_config` makes of a GIT config.json made only of keys known here;
    None (transformers decides) for any other key, or a file that cannot be read."""
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not set(raw) <= _MODEL_ONLY | set(_FROM_MODEL_CONFIG):
        return None
    values = {name: raw.get(name, default) for name, default in _FROM_MODEL_CONFIG.items()}
    values = {name: value for name, value in values.items() if value is not None}
    if values.get("output_attentions") or values.get("output_hidden_states"):
        values["return_dict_in_generate"] = True  # as from_model_config sets it for an output flag
    return values


def _is_transformers_field(name: str) -> bool:
    from transformers import GenerationConfig

    return not name.startswith("_") and name in vars(GenerationConfig())
