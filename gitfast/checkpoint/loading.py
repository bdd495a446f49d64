"""Finding, reading and validating GIT checkpoints (the name map between Hugging Face's layout and
gitfast's is `hf_format.py`).

A checkpoint is a local folder or a hub id (downloaded into the Hugging Face cache on first use, as
transformers does: `hub.py`). Weights come from `model.safetensors` (or its sharded index) first;
`pytorch_model.bin` only through `torch.load(weights_only=True)`. Every tensor must be accounted for: missing,
unexpected or wrongly shaped tensors are errors that name them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from . import hub
from .config_reader import ConfigTypeError, GitSettings, git_settings
from .hf_format import CheckpointError, from_hf_state_dict  # noqa: F401 (loading.CheckpointError is public)
from .hub import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE  # noqa: F401 (loading.SAFE_SINGLE etc. are used elsewhere)


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None, *,
            token: str | bool | None = None, local_files_only: bool = False, subfolder: str = "",
            force_download: bool = False, use_safetensors: bool | None = None) -> Path:
    """A local folder, or the snapshot folder of a hub id: downloaded into the Hugging Face cache on
    first use (only the files gitfast reads; `gitfast.checkpoint.hub`), from the cache when offline
    (`local_files_only=True` or `HF_HUB_OFFLINE=1`). With `subfolder`, that folder inside either."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if subfolder and not (path / subfolder).is_dir():
            raise CheckpointError(f"{str(name_or_path)!r} has no subfolder {subfolder!r}")
        return path / subfolder if subfolder else path
    if path.exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file; expected a checkpoint folder or a hub id")
    try:
        return hub.resolve_hub_id(str(name_or_path), revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only, subfolder=subfolder,
                                  force_download=force_download, use_safetensors=use_safetensors)
    except hub.HubError as exc:
        raise CheckpointError(str(exc)) from exc


def load_config(folder: Path):
    """transformers' `GitConfig` of the checkpoint in `folder`, checked (the drop-in's config)."""
    from transformers import GitConfig

    cfg_file, _ = _git_config_json(folder)
    try:
        config = GitConfig.from_pretrained(str(folder))
    except _config_errors() as exc:  # a field of the wrong type (transformers' strict config classes)
        raise CheckpointError(f"{cfg_file} does not describe a GIT model: {exc}") from exc
    check_config(config, cfg_file)
    return config


def read_config(folder: Path) -> GitSettings:
    """What gitfast reads of the checkpoint's config.json, without importing transformers (the
    Captioner's and the CLI's config; `config_reader.py`), checked as `load_config` checks."""
    cfg_file, raw = _git_config_json(folder)
    try:
        config = git_settings(raw)
    except ConfigTypeError as exc:
        raise CheckpointError(f"{cfg_file} does not describe a GIT model: {exc}") from exc
    check_config(config, cfg_file)
    return config


def _git_config_json(folder: Path) -> Tuple[Path, dict]:
    """config.json of `folder` and its object, refused unless that is a GIT model's."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {folder}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "git":
        raise CheckpointError(f"{folder} holds a {model_type!r} model, not GIT (model_type 'git'); "
                              "gitfast only runs GIT checkpoints such as microsoft/git-base")
    return cfg_file, raw


def _config_errors() -> tuple:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # huggingface_hub before strict dataclasses
        return ValueError, TypeError
    return ValueError, TypeError, StrictDataclassError


# the sizes a GIT model is built from, in config.json and its vision_config; each a whole number >= 1
_TEXT_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
               "max_position_embeddings")
_VISION_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "image_size",
                 "patch_size", "num_channels")


def check_config(config, origin="the config") -> None:
    """Refuses a config whose sizes cannot make a GIT model (zero or negative sizes, heads that do not
    divide the width, patches larger than the image), naming each field, so that a bad config.json is
    one checkpoint error at load time rather than a failure in the middle of a run. `origin` names
    the config (its file) in the message. Called by `load_config` and `build_model`, which every
    front end goes through."""
    problems = []
    parts = (("", config, _TEXT_SIZES), ("vision_config.", config.vision_config, _VISION_SIZES))
    for prefix, part, fields in parts:
        for field in fields:
            value = getattr(part, field, None)
            if not _is_count(value):
                problems.append(f"{prefix}{field} is {value!r}; it must be a whole number of at least 1")
        width, heads = getattr(part, "hidden_size", None), getattr(part, "num_attention_heads", None)
        if _is_count(width) and _is_count(heads) and width % heads:
            problems.append(f"{prefix}num_attention_heads {heads} does not divide {prefix}hidden_size {width}")
    image, patch = config.vision_config.image_size, config.vision_config.patch_size
    if _is_count(image) and _is_count(patch) and patch > image:
        problems.append(f"vision_config.patch_size {patch} is larger than vision_config.image_size {image}")
    frames = config.num_image_with_embedding
    if frames is not None and not (_is_count(frames) or frames == 0):
        problems.append(f"num_image_with_embedding is {frames!r}; it must be null or a whole number")
    if problems:
        raise CheckpointError(f"{origin} does not describe a GIT model: {'; '.join(problems)}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_layer_counts(config, hf_weights: Dict[str, torch.Tensor], origin="the checkpoint") -> None:
    """Refuses a config whose layer counts differ from the layers the weights hold, before a model of
    that many layers is built (a num_hidden_layers of 10**6 would otherwise be built, slowly)."""
    problems = []
    for field, count, pattern in (
            ("num_hidden_layers", config.num_hidden_layers, _DECODER_LAYER),
            ("vision_config.num_hidden_layers", config.vision_config.num_hidden_layers, _VISION_LAYER)):
        present = {m.group(1) for m in map(pattern.match, hf_weights) if m}
        if count != len(present):
            gap = (f"the tensors of {count - len(present)} layers are missing" if count > len(present)
                   else f"{len(present) - count} layers' tensors are unexpected")
            problems.append(f"config.json's {field} is {count}, its weights hold {len(present)} such layers ({gap})")
    if problems:
        raise CheckpointError(f"{origin}: {'; '.join(problems)}")


_DECODER_LAYER = re.compile(r"git\.encoder\.layer\.(\d+)\.")
_VISION_LAYER = re.compile(r"git\.image_encoder\.vision_model\.encoder\.layers\.(\d+)\.")


def read_weights(folder: Path, use_safetensors: bool | None = None) -> Dict[str, torch.Tensor]:
    """All tensors of the checkpoint, preferring safetensors; `.bin` only with weights_only=True.
    `use_safetensors` as transformers reads it: True takes safetensors only, False `.bin` only."""
    from safetensors.torch import load_file

    def shards(index_name):
        try:
            return hub.shard_files(folder / index_name)
        except hub.HubError as exc:
            raise CheckpointError(str(exc)) from exc

    allowed = hub.weight_files(use_safetensors)
    found = next((name for name in allowed if (folder / name).is_file()), None)
    if found in (SAFE_SINGLE, SAFE_INDEX):
        files, reader = [SAFE_SINGLE] if found == SAFE_SINGLE else shards(SAFE_INDEX), lambda p: load_file(str(p))
    elif found is not None:
        files = [BIN_SINGLE] if found == BIN_SINGLE else shards(BIN_INDEX)
        reader = lambda p: torch.load(str(p), map_location="cpu", weights_only=True)  # noqa: E731
    else:
        only = "" if use_safetensors is None else f" (use_safetensors={use_safetensors})"
        raise CheckpointError(f"no weights in {folder}{only}: expected {' or '.join(allowed)}")
    weights: Dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():  # a FIFO or device would block or never end
            raise CheckpointError(f"{folder / name} is missing or not a regular file")
        try:
            weights.update(reader(folder / name))
        except Exception as exc:  # corrupt or truncated files: say which one
            raise CheckpointError(f"cannot read {folder / name}: {exc}") from exc
    return weights


# --- every step in one call (tests, scripts; the drop-in and the Captioner call the steps) ---

@dataclass
class Checkpoint:
    """A loaded GIT checkpoint, as `load_checkpoint` returns it."""
    folder: Path
    config: Any               # transformers.GitConfig
    model: Any                # gitfast.model.GitModel, eval mode, placed
    generation_config: Any    # transformers.GenerationConfig


def build_model(config, hf_weights: Dict[str, torch.Tensor], dtype=None, device=None, origin=None):
    """A `GitModel` from Hugging Face-named tensors: built on the meta device, then the (mapped)
    tensors are assigned, so no second copy is allocated; placed and in eval mode. `origin` (the
    checkpoint folder) is named in errors."""
    from ..devices import resolve_device, resolve_dtype
    from ..model import GitModel

    check_config(config, f"{origin}/config.json" if origin is not None else "the config")
    check_layer_counts(config, hf_weights, str(origin) if origin is not None else "the checkpoint")
    with torch.device("meta"):
        model = GitModel(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(from_hf_state_dict(hf_weights, config, shapes), strict=True, assign=True)
    return model.to(device=resolve_device(device or "cpu"), dtype=resolve_dtype(dtype, config)).eval()


def generation_config_of(folder: Path, config):
    """transformers' `GenerationConfig` of the checkpoint (the drop-in's)."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder))
    return GenerationConfig.from_model_config(config)


def read_generation_config(folder: Path, config):
    """The Captioner's generation config: `plain_generation.PlainGenerationConfig` (no transformers
    import) where generation_config.json holds only the fields gitfast implements, else
    `generation_config_of` (for `config`, a `GitSettings`, through its `GitConfig`)."""
    from . import plain_generation

    def of_transformers(folder):
        return generation_config_of(folder, config.to_git_config() if isinstance(config, GitSettings) else config)

    return plain_generation.read(folder, of_transformers)


def load_checkpoint(name_or_path, *, dtype=None, device=None, revision=None, cache_dir=None, token=None,
                    local_files_only=False) -> Checkpoint:
    """Resolves (downloading a hub id if needed), reads and places a checkpoint once."""
    folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                     local_files_only=local_files_only)
    config = load_config(folder)
    model = build_model(config, read_weights(folder), dtype, device, origin=folder)
    return Checkpoint(folder, config, model, generation_config_of(folder, config))


def load_processor(folder: Path, config=None):
    """The checkpoint's tokenizer and image preprocessing (`processor.Processor`: transformers' pixels,
    without its processing stack), checked against its config."""
    from . import processor as processing

    try:
        loaded = processing.load(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{folder} has no usable GIT processor (preprocessor_config.json and tokenizer files): {exc}") from exc
    if config is not None:
        check_processor(loaded, config, folder)
    return loaded


def check_processor(processor, config, folder) -> None:
    """Refuses a processor that does not belong to the model: transformers quietly builds a 5-token
    tokenizer for a checkpoint without tokenizer files (every caption then decodes to ""), and an
    image processor of another size feeds the vision encoder pictures it was not made for."""
    tok, problems = processor.tokenizer, []
    if len(tok) != config.vocab_size:
        problems.append(f"its tokenizer has {len(tok)} tokens, the model's vocabulary {config.vocab_size}")
    for role, ours, model in (("[CLS] (bos)", tok.cls_token_id, config.bos_token_id),
                              ("[SEP] (eos)", tok.sep_token_id, config.eos_token_id)):
        if ours is not None and model is not None and ours != model:
            problems.append(f"its tokenizer's {role} id is {ours}, the model's {model}")
    image = processor.image_processor
    crop = getattr(image, "crop_size", None) if getattr(image, "do_center_crop", False) else getattr(image, "size", None)
    side = config.vision_config.image_size
    if hasattr(crop, "get") and (crop.get("height"), crop.get("width")) != (side, side):
        problems.append(f"its image processor makes {crop.get('height')}x{crop.get('width')} pictures, "
                        f"the vision encoder takes {side}x{side}")
    problems += _bad_image_sizes(image)
    if problems:
        raise CheckpointError(f"{folder}: the processor files do not match the model: {'; '.join(problems)}. "
                                      "Are tokenizer or preprocessor files missing, or from another checkpoint?")


def _bad_image_sizes(image_processor) -> list:
    """The sizes in preprocessor_config.json that no picture can be resized or cropped to (a
    shortest_edge of 0 would fail every image, one error record each)."""
    problems = []
    for field, used in (("size", getattr(image_processor, "do_resize", True)),
                        ("crop_size", getattr(image_processor, "do_center_crop", False))):
        sizes = getattr(image_processor, field, None)
        if not used or not hasattr(sizes, "get"):
            continue
        for side in ("shortest_edge", "longest_edge", "height", "width"):
            value = sizes.get(side)
            if value is not None and not _is_count(value):
                problems.append(f"preprocessor_config.json's {field}.{side} is {value!r}; it must be a whole "
                                "number of at least 1")
    return problems
