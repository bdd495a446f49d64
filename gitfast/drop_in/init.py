"""Initial weights for a model built from a config, equal to transformers' for the same seed.

transformers' `GitForCausalLM(config)` first builds every module with torch's default init (drawing
random numbers it later throws away), then `post_init` re-draws the weights, one sub-model at a time
(the vision model, then the text model, then the LM head). gitfast's layout differs (one fused QKV per
layer), so instead of building the same modules we replay the same draws in the same order: the
throw-away ones on scratch tensors, the kept ones into Hugging Face-named tensors, which
`hf_format.from_hf_state_dict` maps into gitfast's layout as it does for a checkpoint.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from ..checkpoint import hf_format

# One draw: (what, hf name or None for a scratch tensor, shape, std). `what` is "uniform" (a default
# init: only its RNG use matters), "normal", "zero_row" (the padding row of an embedding).
Draw = Tuple[str, object, tuple, float]


def _linear_default(out_f: int, in_f: int) -> List[Draw]:
    return [("uniform", None, (out_f, in_f), 0.0), ("uniform", None, (out_f,), 0.0)]  # kaiming weight, bias


def _vision(v) -> Tuple[List[Draw], List[Draw]]:
    """The vision model's construction draws and its own post_init draws."""
    vm, d, std = "git.image_encoder.vision_model", v.hidden_size, v.initializer_range
    positions = (v.image_size // v.patch_size) ** 2 + 1
    patch = (d, v.num_channels, v.patch_size, v.patch_size)
    build: List[Draw] = [("normal", None, (d,), 1.0), ("uniform", None, patch, 0.0), ("normal", None, (positions, d), 1.0)]
    post: List[Draw] = [("normal", f"{vm}.embeddings.patch_embedding.weight", patch, std),
                        ("normal", f"{vm}.embeddings.position_embedding.weight", (positions, d), std),
                        ("normal", f"{vm}.embeddings.class_embedding", (d,), std),
                        ("normal", f"{vm}.embeddings.patch_embedding.weight", patch, std),
                        ("normal", f"{vm}.embeddings.position_embedding.weight", (positions, d), std)]
    for i in range(v.num_hidden_layers):
        layer = f"{vm}.encoder.layers.{i}"
        for name, out_f, in_f in [("self_attn.k_proj", d, d), ("self_attn.v_proj", d, d), ("self_attn.q_proj", d, d),
                                  ("self_attn.out_proj", d, d), ("mlp.fc1", v.intermediate_size, d),
                                  ("mlp.fc2", d, v.intermediate_size)]:
            build += _linear_default(out_f, in_f)
            post.append(("normal", f"{layer}.{name}.weight", (out_f, in_f), std))
    return build, post


def _text(c) -> Tuple[List[Draw], List[Draw]]:
    """The text model's construction draws after the vision model's, and its post_init draws."""
    h, std = c.hidden_size, c.initializer_range
    build: List[Draw] = []
    post: List[Draw] = [("normal", "git.embeddings.word_embeddings.weight", (c.vocab_size, h), std)]
    if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size:
        post.append(("zero_row", "git.embeddings.word_embeddings.weight", (c.vocab_size, h), float(c.pad_token_id)))
    post.append(("normal", "git.embeddings.position_embeddings.weight", (c.max_position_embeddings, h), std))
    for i in range(c.num_hidden_layers):
        layer = f"git.encoder.layer.{i}"
        for name, out_f, in_f in [("attention.self.query", h, h), ("attention.self.key", h, h),
                                  ("attention.self.value", h, h), ("attention.output.dense", h, h),
                                  ("intermediate.dense", c.intermediate_size, h), ("output.dense", h, c.intermediate_size)]:
            build += _linear_default(out_f, in_f)
            post.append(("normal", f"{layer}.{name}.weight", (out_f, in_f), std))
    build += _linear_default(h, c.vision_config.hidden_size)
    post.append(("normal", "git.visual_projection.visual_projection.0.weight", (h, c.vision_config.hidden_size), std))
    return build, post


def plan(config) -> List[Draw]:
    """Every random draw of `transformers.GitForCausalLM(config)`, in its order."""
    c = config
    h = c.hidden_size
    # the text embeddings are built (torch's N(0, 1) init) before the vision model
    draws: List[Draw] = [("normal", None, (c.vocab_size, h), 1.0), ("normal", None, (c.max_position_embeddings, h), 1.0)]
    vision_build, vision_post = _vision(c.vision_config)
    text_build, text_post = _text(c)
    draws += vision_build + vision_post + text_build + text_post
    draws += _linear_default(c.vocab_size, h)
    draws.append(("normal", "output.weight", (c.vocab_size, h), c.initializer_range))
    return draws


@torch.no_grad()
def initial_hf_weights(config, device=None, dtype=None) -> Dict[str, torch.Tensor]:
    """Hugging Face-named initial weights, drawing from torch's RNG exactly as transformers does."""
    dtype = dtype or torch.get_default_dtype()
    found: Dict[str, torch.Tensor] = {}
    for what, name, shape, std in plan(config):
        t = found.get(name) if name is not None else None
        if t is None:
            t = torch.empty(shape, device=device, dtype=dtype)
        if what == "uniform":
            bound = 1 / math.sqrt(shape[-1]) if len(shape) > 1 else 1.0
            t.uniform_(-bound, bound)  # only the RNG use matters: construction values are re-drawn
        elif what == "normal":
            t.normal_(mean=0.0, std=std)
        else:  # zero_row
            t[int(std)] = 0
        if name is not None:
            found[name] = t
    out = {}
    for name, (shape, norm_weight) in _hf_tensors(config).items():
        if name in found:
            out[name] = found[name]
        else:  # LayerNorm weights 1; biases, temporal embeddings 0
            out[name] = (torch.ones if norm_weight else torch.zeros)(shape, device=device, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        out["output.weight"] = out["git.embeddings.word_embeddings.weight"]
    return out


def _hf_tensors(config) -> Dict[str, Tuple[tuple, bool]]:
    """Every Hugging Face tensor of a GIT model with this config: its shape, and whether it is a
    LayerNorm weight."""
    from ..model import GitModel

    with torch.device("meta"):
        model = GitModel(config)
    ours = model.state_dict()
    out = {}
    for name, (names, _, split) in hf_format.name_map(config).items():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        norm = isinstance(owner, torch.nn.LayerNorm) and name.endswith("weight")
        for n, part in zip(names, split(ours[name])):
            out[n] = (tuple(part.shape), norm)
    return out
