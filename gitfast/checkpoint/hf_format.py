"""transformers' GIT checkpoint format: the name map between Hugging Face's tensors and gitfast's fused
layout (both ways), and writing a checkpoint transformers loads.

gitfast keeps one QKV projection per layer and its own short names; transformers' `GitForCausalLM`
keeps q, k and v apart under `git.encoder.layer.{i}.attention.self.*`. Every rule below says which HF
tensors make one gitfast tensor, how they merge, and how to split it back for saving.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

# Non-persistent buffers that some older checkpoints still carry; they hold nothing we need.
IGNORED_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as GIT, with the reason."""


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


def save(model, config, save_directory, generation_config=None) -> None:
    """Writes `model` (a gitfast `GitModel`) as a transformers `GitForCausalLM` checkpoint: config.json,
    generation_config.json when given, model.safetensors under HF names. A dynamically quantized model
    is refused: its INT8 weights have no place in that format."""
    from safetensors.torch import save_file

    from .hub import SAFE_SINGLE
    from ..quantization import describe

    if describe(model) is not None:
        raise NotImplementedError("a dynamically quantized model cannot be saved as a transformers checkpoint "
                                  "(its Linear layers hold INT8 weights); save the model before quantizing, and "
                                  "load it with quantization_config='dynamic'")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    if generation_config is not None:
        generation_config.save_pretrained(str(out))
    save_file(to_hf_state_dict(model.state_dict(), config), str(out / SAFE_SINGLE), metadata={"format": "pt"})
