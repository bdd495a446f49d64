"""Finding, reading and validating GIT checkpoints, and mapping Hugging Face names to gitfast's layout.

A checkpoint is a local folder or a hub id (downloaded into the Hugging Face cache on first use, as
transformers does: `hub.py`). Weights come from `model.safetensors` (or its sharded index) first;
`pytorch_model.bin` only through `torch.load(weights_only=True)`. Every tensor must be accounted for: missing,
unexpected or wrongly shaped tensors are errors that name them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from .hub import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE  # noqa: F401 (loading.SAFE_SINGLE etc. are used elsewhere)

# Non-persistent buffers that some older checkpoints still carry; they hold nothing we need.
IGNORED_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as GIT, with the reason."""


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None, *,
            token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """A local folder, or the snapshot folder of a hub id: downloaded into the Hugging Face cache on
    first use (only the files gitfast reads; `gitfast.hub`), from the cache when offline
    (`local_files_only=True` or `HF_HUB_OFFLINE=1`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file; expected a checkpoint folder or a hub id")
    from . import hub

    try:
        return hub.resolve_hub_id(str(name_or_path), revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only)
    except hub.HubError as exc:
        raise CheckpointError(str(exc)) from exc


def load_config(folder: Path):
    from transformers import GitConfig

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {folder}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc
    if raw.get("model_type") != "git":
        raise CheckpointError(f"{folder} holds a {raw.get('model_type')!r} model, not GIT (model_type 'git'); "
                              "gitfast only runs GIT checkpoints such as microsoft/git-base")
    return GitConfig.from_pretrained(str(folder))


def read_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """All tensors of the checkpoint, preferring safetensors; `.bin` only with weights_only=True."""
    from safetensors.torch import load_file

    def shards(index_name):
        index = json.loads((folder / index_name).read_text())
        return sorted(set(index["weight_map"].values()))

    if (folder / SAFE_SINGLE).is_file():
        files, reader = [SAFE_SINGLE], lambda p: load_file(str(p))
    elif (folder / SAFE_INDEX).is_file():
        files, reader = shards(SAFE_INDEX), lambda p: load_file(str(p))
    elif (folder / BIN_SINGLE).is_file() or (folder / BIN_INDEX).is_file():
        files = [BIN_SINGLE] if (folder / BIN_SINGLE).is_file() else shards(BIN_INDEX)
        reader = lambda p: torch.load(str(p), map_location="cpu", weights_only=True)  # noqa: E731
    else:
        raise CheckpointError(f"no weights in {folder}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
    weights: Dict[str, torch.Tensor] = {}
    for name in files:
        try:
            weights.update(reader(folder / name))
        except Exception as exc:  # corrupt or truncated files: say which one
            raise CheckpointError(f"cannot read {folder / name}: {exc}") from exc
    return weights


# --- name mapping -------------------------------------------------------------------------------
# Each entry: gitfast name -> (HF names, merge function, split function for saving back).
Rule = Tuple[List[str], Callable, Callable]


def _same(ts):
    return ts[0]


def _cat(ts):
    return torch.cat(ts, dim=0)


def _unsplit(n):
    return lambda t: list(t.chunk(n, dim=0))


def _temporal(ts):
    return torch.cat([t.reshape(1, -1) for t in ts], dim=0)  # F x [1, 1, W] -> [F, W]


def name_map(config) -> Dict[str, Rule]:
    rules: Dict[str, Rule] = {}

    def one(ours, theirs):
        rules[ours] = ([theirs], _same, lambda t: [t])

    def linear(ours, theirs):
        for p in ("weight", "bias"):
            one(f"{ours}.{p}", f"{theirs}.{p}")

    vm = "git.image_encoder.vision_model"
    one("vision.embeddings.class_embedding", f"{vm}.embeddings.class_embedding")
    one("vision.embeddings.patch_embedding", f"{vm}.embeddings.patch_embedding.weight")
    one("vision.embeddings.position_embedding", f"{vm}.embeddings.position_embedding.weight")
    linear("vision.pre_ln", f"{vm}.pre_layrnorm")
    linear("vision.post_ln", f"{vm}.post_layernorm")
    for i in range(config.vision_config.num_hidden_layers):
        src, dst = f"{vm}.encoder.layers.{i}", f"vision.layers.{i}"
        for p in ("weight", "bias"):
            rules[f"{dst}.qkv.{p}"] = ([f"{src}.self_attn.{x}_proj.{p}" for x in "qkv"], _cat, _unsplit(3))
        linear(f"{dst}.out", f"{src}.self_attn.out_proj")
        linear(f"{dst}.ln1", f"{src}.layer_norm1")
        linear(f"{dst}.ln2", f"{src}.layer_norm2")
        linear(f"{dst}.fc1", f"{src}.mlp.fc1")
        linear(f"{dst}.fc2", f"{src}.mlp.fc2")
    if config.num_image_with_embedding:
        n = config.num_image_with_embedding
        rules["temporal_embedding"] = ([f"git.img_temporal_embedding.{f}" for f in range(n)], _temporal,
                                       lambda t: [r.reshape(1, 1, -1) for r in t])
    linear("proj", "git.visual_projection.visual_projection.0")
    linear("proj_ln", "git.visual_projection.visual_projection.1")
    one("word_embeddings.weight", "git.embeddings.word_embeddings.weight")
    one("position_embeddings.weight", "git.embeddings.position_embeddings.weight")
    linear("embed_ln", "git.embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        src, dst = f"git.encoder.layer.{i}", f"layers.{i}"
        for p in ("weight", "bias"):
            rules[f"{dst}.qkv.{p}"] = ([f"{src}.attention.self.{x}.{p}" for x in ("query", "key", "value")],
                                       _cat, _unsplit(3))
        linear(f"{dst}.attn_out", f"{src}.attention.output.dense")
        linear(f"{dst}.attn_ln", f"{src}.attention.output.LayerNorm")
        linear(f"{dst}.fc1", f"{src}.intermediate.dense")
        linear(f"{dst}.fc2", f"{src}.output.dense")
        linear(f"{dst}.out_ln", f"{src}.output.LayerNorm")
    linear("lm_head", "output")
    return rules


def from_hf_state_dict(hf: Dict[str, torch.Tensor], config, expected_shapes: Dict[str, torch.Size]) -> Dict[str, torch.Tensor]:
    """HF-named tensors -> gitfast-named tensors, refusing anything missing, unexpected or misshapen."""
    hf = {k: v for k, v in hf.items() if not k.endswith(IGNORED_SUFFIXES)}
    if "output.weight" not in hf and getattr(config, "tie_word_embeddings", False):
        if "git.embeddings.word_embeddings.weight" in hf:
            hf["output.weight"] = hf["git.embeddings.word_embeddings.weight"]
    rules = name_map(config)
    needed = [n for names, _, _ in rules.values() for n in names]
    missing = [n for n in needed if n not in hf]
    unexpected = sorted(set(hf) - set(needed))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if problems:
        raise CheckpointError("checkpoint does not match its GIT config: " + "; ".join(problems))
    out = {}
    for ours, (names, merge, _) in rules.items():
        t = merge([hf[n] for n in names])
        want = expected_shapes[ours]
        if t.shape != want:
            detail = ", ".join(f"{n} {tuple(hf[n].shape)}" for n in names)
            raise CheckpointError(f"wrong shape for {detail}: the config needs {tuple(want)} for gitfast's {ours}")
        out[ours] = t
    return out


def to_hf_state_dict(ours: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """gitfast-named tensors -> HF names (for save_pretrained); contiguous copies, safe to serialise."""
    out = {}
    for name, (names, _, split) in name_map(config).items():
        for n, t in zip(names, split(ours[name])):
            out[n] = t.detach().contiguous().clone()
    return out


# --- the one loader -----------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded GIT checkpoint: what the drop-in, the Captioner and every rank start from."""
    folder: Path
    config: Any               # transformers.GitConfig
    model: Any                # gitfast.model.GitModel, eval mode, placed
    generation_config: Any    # transformers.GenerationConfig


def build_model(config, hf_weights: Dict[str, torch.Tensor], dtype=None, device=None):
    """A `GitModel` from Hugging Face-named tensors: built on the meta device, then the (mapped)
    tensors are assigned, so no second copy is allocated; placed and in eval mode."""
    from .devices import resolve_device, resolve_dtype
    from .model import GitModel

    with torch.device("meta"):
        model = GitModel(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(from_hf_state_dict(hf_weights, config, shapes), strict=True, assign=True)
    return model.to(device=resolve_device(device or "cpu"), dtype=resolve_dtype(dtype, config)).eval()


def generation_config_of(folder: Path, config):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder))
    return GenerationConfig.from_model_config(config)


def load_checkpoint(name_or_path, *, dtype=None, device=None, revision=None, cache_dir=None, token=None,
                    local_files_only=False) -> Checkpoint:
    """Resolves (downloading a hub id if needed), reads and places a checkpoint once."""
    folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                     local_files_only=local_files_only)
    config = load_config(folder)
    model = build_model(config, read_weights(folder), dtype, device)
    return Checkpoint(folder, config, model, generation_config_of(folder, config))


def load_processor(folder: Path, config=None):
    """The checkpoint's GitProcessor (image processor + tokenizer), checked against its config."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{folder} has no usable GIT processor (preprocessor_config.json and tokenizer files): {exc}") from exc
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise CheckpointError(f"{folder} holds a {type(processor).__name__}, not a GitProcessor "
                              "(image processor + tokenizer)")
    if config is not None:
        check_processor(processor, config, folder)
    return processor


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
    if problems:
        raise CheckpointError(f"{folder}: the processor files do not match the model: {'; '.join(problems)}. "
                                      "Are tokenizer or preprocessor files missing, or from another checkpoint?")
