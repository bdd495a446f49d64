"""GIT, written for inference: CLIP vision encoder -> projection -> BERT-style decoder -> LM head.

Weights use gitfast's fused layout (one QKV projection per layer; `hf_format.py` maps Hugging Face's
names to it and back). Every block has exactly one attention call site (`attention/`), one MLP
call site, add+LayerNorm call sites and `ops.Linear` layers (`ops.py`; gitfast.quantization swaps
them for INT8 ones), so faster backends plug in without touching this file. Caching is the caller's:
the `attend` callback of `decode` (the serving wing passes one that reads and writes the paged KV
cache as an `attention.AttentionMetadata` says). The vision encoder takes an `attend` callback too,
`attention.bidirectional` unless the caller (word maps, for the probabilities) hands another.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, ops


def num_image_tokens(config) -> int:
    """Image tokens per sample: (patches + class token) per frame, times frames for video checkpoints."""
    v = config.vision_config
    per_frame = (v.image_size // v.patch_size) ** 2 + 1
    return per_frame * (config.num_image_with_embedding or 1)


def _split_qkv(x: torch.Tensor, num_heads: int):
    """Fused projection output [..., 3W] laid out [q | k | v] -> three [..., heads, head_dim] views."""
    return x.unflatten(-1, (3, num_heads, -1)).unbind(-3)


def bidirectional(layer: int, q, k, v):
    """The vision encoder's default `attend(layer, q, k, v)`: every token sees every token of its image."""
    return attention.bidirectional(q, k, v)


class VisionEmbeddings(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.patch_size, self.image_size = v.patch_size, v.image_size
        self.class_embedding = nn.Parameter(torch.empty(v.hidden_size))
        self.patch_embedding = nn.Parameter(torch.empty(v.hidden_size, v.num_channels, v.patch_size, v.patch_size))
        self.position_embedding = nn.Parameter(torch.empty((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size))

    def positions(self, height: int, width: int) -> torch.Tensor:
        grid = self.image_size // self.patch_size
        if height == width == self.image_size:
            return self.position_embedding
        # Bicubic resampling of the patch grid's position table, as transformers' interpolate_pos_encoding.
        cls_pos, patch_pos = self.position_embedding[:1], self.position_embedding[1:]
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(height // self.patch_size, width // self.patch_size),
                                  mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).flatten(0, 2)])

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        _, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(f"input image size ({height}*{width}) doesn't match the model "
                             f"({self.image_size}*{self.image_size}); pass interpolate_pos_encoding=True")
        w = self.patch_embedding
        patches = ops.patch_conv(pixel_values.to(w.dtype), w, self.patch_size).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions(height, width)


class VisionLayer(nn.Module):
    """Pre-LayerNorm CLIP block. `forward` takes the residual stream, the previous block's output and
    the `attend(layer, q, k, v)` callback."""

    def __init__(self, v, index: int = 0):
        super().__init__()
        w = v.hidden_size
        self.index, self.num_heads, self.eps, self.act = index, v.num_attention_heads, v.layer_norm_eps, v.hidden_act
        self.ln1, self.ln2 = nn.LayerNorm(w, eps=v.layer_norm_eps), nn.LayerNorm(w, eps=v.layer_norm_eps)
        self.qkv, self.out = ops.Linear(w, 3 * w), ops.Linear(w, w)
        self.fc1, self.fc2 = ops.Linear(w, v.intermediate_size), ops.Linear(v.intermediate_size, w)

    def heads(self, x: torch.Tensor):
        """q, k, v `[..., heads, head_dim]` of the normalised stream `x`."""
        return _split_qkv(self.qkv(x), self.num_heads)

    def forward(self, delta, residual, attend=bidirectional):
        # the first block has no previous output to add: it normalises the residual stream itself
        x, residual = (ops.add_layer_norm(residual, None, self.ln1.weight, self.ln1.bias, self.eps) if delta is None
                       else ops.add_layer_norm(delta, residual, self.ln1.weight, self.ln1.bias, self.eps))
        a = self.out(attend(self.index, *self.heads(x)).flatten(-2))
        x, residual = ops.add_layer_norm(a, residual, self.ln2.weight, self.ln2.bias, self.eps)
        return ops.feed_forward(x, self.fc1, self.fc2, self.act), residual


class VisionEncoder(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.eps = v.layer_norm_eps
        self.embeddings = VisionEmbeddings(v)
        self.pre_ln, self.post_ln = nn.LayerNorm(v.hidden_size, eps=self.eps), nn.LayerNorm(v.hidden_size, eps=self.eps)
        self.layers = nn.ModuleList(VisionLayer(v, i) for i in range(v.num_hidden_layers))

    def forward(self, pixel_values, interpolate_pos_encoding=False, attend=bidirectional):
        h = self.embeddings(pixel_values, interpolate_pos_encoding)
        residual, _ = ops.add_layer_norm(h, None, self.pre_ln.weight, self.pre_ln.bias, self.eps)
        delta = None
        for layer in self.layers:
            delta, residual = layer(delta, residual, attend)
        return ops.add_layer_norm(delta, residual, self.post_ln.weight, self.post_ln.bias, self.eps)[0]


class DecoderLayer(nn.Module):
    """Post-LayerNorm BERT block; attention goes through the KV cache handed in by the caller."""

    def __init__(self, config, index: int):
        super().__init__()
        w = config.hidden_size
        self.index, self.num_heads, self.eps, self.act = index, config.num_attention_heads, config.layer_norm_eps, config.hidden_act
        self.qkv, self.attn_out = ops.Linear(w, 3 * w), ops.Linear(w, w)
        self.attn_ln, self.out_ln = nn.LayerNorm(w, eps=self.eps), nn.LayerNorm(w, eps=self.eps)
        self.fc1, self.fc2 = ops.Linear(w, config.intermediate_size), ops.Linear(config.intermediate_size, w)

    def heads(self, h: torch.Tensor):
        """q, k, v `[..., heads, head_dim]` of the token features `h`."""
        return _split_qkv(self.qkv(h), self.num_heads)

    def forward(self, h, attend):
        a = self.attn_out(attend(self.index, *self.heads(h)).flatten(-2))
        h, _ = ops.add_layer_norm(a, h, self.attn_ln.weight, self.attn_ln.bias, self.eps)
        m = ops.feed_forward(h, self.fc1, self.fc2, self.act)
        return ops.add_layer_norm(m, h, self.out_ln.weight, self.out_ln.bias, self.eps)[0]


def _embedding(rows: int, width: int, padding_idx: Optional[int] = None) -> nn.Embedding:
    """An Embedding with an uninitialised weight. Every GitModel is built on the meta device and its
    weights assigned after; Embedding's own random init (normal_) on meta would import torch._dynamo,
    a second of start-up (issue #25)."""
    return nn.Embedding(rows, width, padding_idx=padding_idx, _weight=torch.empty(rows, width))


class GitModel(nn.Module):
    """The whole network. `encode_images` and `embed_text` produce token features; `decode` runs the
    decoder over them with an attention callback that owns masking and caching."""

    def __init__(self, config):
        super().__init__()
        v = config.vision_config
        self.config = config
        self.num_image_tokens = num_image_tokens(config)
        self.vision = VisionEncoder(v)
        frames = config.num_image_with_embedding
        self.temporal_embedding = nn.Parameter(torch.empty(frames, v.hidden_size)) if frames else None
        self.proj = ops.Linear(v.hidden_size, config.hidden_size)
        self.proj_ln = nn.LayerNorm(config.hidden_size, eps=v.layer_norm_eps)
        # padding_idx as transformers: the pad token's embedding gets no gradient
        self.word_embeddings = _embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = _embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.lm_head = ops.Logits(config.hidden_size, config.vocab_size)

    def encode_images(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                      attend=bidirectional) -> torch.Tensor:
        """[B, 3, H, W] images or [B, frames, 3, H, W] videos -> projected image tokens [B, I, hidden];
        the vision encoder attends through `attend(layer, q, k, v)` (frames batched, `[B * frames, P, H, D]`)."""
        if pixel_values.ndim == 4:
            feats = self.vision(pixel_values, interpolate_pos_encoding, attend)
        elif pixel_values.ndim == 5:
            b, f = pixel_values.shape[:2]
            if self.temporal_embedding is None or f > self.temporal_embedding.shape[0]:
                raise ValueError(f"got {f} frames per sample, but this checkpoint has "
                                 f"num_image_with_embedding={self.config.num_image_with_embedding}")
            # All frames go through the encoder as one batch; frame i then gets its temporal embedding.
            feats = self.vision(pixel_values.flatten(0, 1), interpolate_pos_encoding, attend).unflatten(0, (b, f))
            feats = (feats + self.temporal_embedding[:f, None, :]).flatten(1, 2)
        else:
            raise ValueError(f"pixel_values must be 4-D (images) or 5-D (videos), got shape {tuple(pixel_values.shape)}")
        x = self.proj(feats)
        return ops.add_layer_norm(x, None, self.proj_ln.weight, self.proj_ln.bias, self.proj_ln.eps)[0]

    def embed_text(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        words, pos = self.word_embeddings(input_ids), self.position_embeddings(position_ids)
        return ops.add_layer_norm(words, pos, self.embed_ln.weight, self.embed_ln.bias, self.embed_ln.eps)[0]

    def decode(self, h: torch.Tensor, attend) -> torch.Tensor:
        """Decoder layers over token features `h` [..., hidden]; `attend(layer, q, k, v)` -> [..., heads, head_dim]."""
        for layer in self.layers:
            h = layer(h, attend)
        return h

    def decode_prefix(self, h: torch.Tensor, attend, store) -> None:
        """The decoder over image tokens `h` for their keys and values only. Image tokens attend only to
        each other and text reads them from the cache, so the last layer's attention and MLP over them
        would be thrown away: it stops at the last layer's projection, `store(layer, k, v)`."""
        if not len(self.layers):
            return
        for layer in self.layers[:-1]:
            h = layer(h, attend)
        last = self.layers[-1]
        _, k, v = last.heads(h)
        store(last.index, k, v)

    def save_pretrained(self, save_directory) -> None:
        """Writes this network as a transformers `GitForCausalLM` checkpoint (config.json, model.safetensors),
        which gitfast and transformers both load."""
        from .checkpoint.hf_format import save

        save(self, self.config, save_directory)

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads
