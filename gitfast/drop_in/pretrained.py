"""`from_pretrained` for the drop-in: transformers' arguments, gitfast's loader.

A complete checkpoint is built straight into gitfast's layout (meta construction, tensors assigned:
no second copy). With `output_loading_info=True` the load is lenient as transformers' is: missing
tensors keep their initial values (as `GitForCausalLM(config)` draws them) and, like unexpected or
(with `ignore_mismatched_sizes`) mis-shaped ones, are reported instead of refused. Tensor names in the
report are gitfast's parameter names (`model.layers.0.qkv.weight`), as in `state_dict()`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..checkpoint import hf_format, loading
from ..devices import resolve_device, resolve_dtype

_BASE_PREFIXES = ("embeddings.", "image_encoder.", "encoder.", "visual_projection.", "img_temporal_embedding.")
META_REFUSAL = ("You are using `from_pretrained` with a meta device context manager or `torch.set_default_device('meta')`. "
                "gitfast, like transformers, reads weights onto a real device: build the model without the context "
                "manager, or use `GitForCausalLM(config)` inside it for an empty (meta) model.")


def hf_named(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face names: a base `GitModel` checkpoint's keys get the head's `git.` prefix."""
    if weights and all(k.startswith(_BASE_PREFIXES) for k in weights):
        return {f"git.{k}": v for k, v in weights.items()}
    return weights


def gitfast_named(weights: Dict[str, torch.Tensor], config) -> Optional[Dict[str, torch.Tensor]]:
    """The tensors under gitfast's own names (a drop-in's `state_dict()`), or None if they are HF-named."""
    if not weights or not all(k.startswith("model.") for k in weights):
        return None
    return {k[len("model."):]: v for k, v in weights.items()}


def lenient(cls, config, weights, ignore_mismatched_sizes: bool):
    """A drop-in initialised from `config`, then every tensor `weights` holds copied in; with the report
    transformers' `output_loading_info` gives."""
    model = cls(config)
    shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    ours = gitfast_named(weights, config)
    unexpected, mismatched, loaded = set(), [], {}
    if ours is None:
        hf = {k: v for k, v in hf_named(weights).items() if not k.endswith(hf_format.IGNORED_SUFFIXES)}
        used = set()
        for name, (names, merge, _) in hf_format.name_map(config).items():
            if all(n in hf for n in names):
                loaded[name] = merge([hf[n] for n in names])
                used.update(names)
        unexpected = {k for k in hf if k not in used}
    else:
        loaded = {k: v for k, v in ours.items() if k in shapes}
        unexpected = {f"model.{k}" for k in ours if k not in shapes}
    for name in list(loaded):
        if loaded[name].shape != shapes[name]:
            if not ignore_mismatched_sizes:
                raise loading.CheckpointError(f"wrong shape for {name}: {tuple(loaded[name].shape)} in the checkpoint, "
                                              f"{tuple(shapes[name])} in the model (ignore_mismatched_sizes=True skips it)")
            mismatched.append((f"model.{name}", tuple(loaded.pop(name).shape), tuple(shapes[name])))
    result = model.model.load_state_dict(loaded, strict=False)
    tied = set(model.all_tied_weights_keys)
    missing = {f"model.{k}" for k in result.missing_keys} - (tied if loaded.get("word_embeddings.weight") is not None else set())
    info = {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched, "error_msgs": []}
    return model, info


def load(cls, pretrained_model_name_or_path, config=None, state_dict=None, output_loading_info=False, dtype=None,
         device=None, revision=None, cache_dir=None, ignore_mismatched_sizes=False, hub_kwargs=None,
         use_safetensors=None):
    from transformers import GenerationConfig

    if torch.get_default_device().type == "meta":
        raise RuntimeError(META_REFUSAL)
    folder = None
    if pretrained_model_name_or_path is not None:
        folder = loading.resolve(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                 use_safetensors=use_safetensors, **(hub_kwargs or {}))
        config = config if config is not None else loading.load_config(folder)
        weights = state_dict if state_dict is not None else loading.read_weights(folder, use_safetensors)
    elif config is None or state_dict is None:
        raise ValueError("from_pretrained(None, ...) needs both config= and state_dict=")
    else:
        weights = state_dict
    if output_loading_info or ignore_mismatched_sizes:
        model, info = lenient(cls, config, weights, ignore_mismatched_sizes)
        model.model.to(device=resolve_device(device or "cpu"), dtype=resolve_dtype(dtype, config))
        model.eval()
    else:
        ours = gitfast_named(weights, config)
        if ours is not None:
            weights = hf_format.to_hf_state_dict(ours, config)
        model = cls._from_weights(config, hf_named(weights), dtype, device)
        info = None
    model.generation_config = (loading.generation_config_of(folder, config) if folder is not None
                               else GenerationConfig.from_model_config(config))
    if pretrained_model_name_or_path is not None:
        model.name_or_path = str(pretrained_model_name_or_path)
        model.config._name_or_path = str(pretrained_model_name_or_path)
    return (model, info) if output_loading_info else model
