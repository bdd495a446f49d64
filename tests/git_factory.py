"""Small random GIT checkpoints for tests: built with transformers, made decisive for greedy checks."""
from __future__ import annotations

import torch
import transformers
from transformers import GitConfig

# name -> (decoder hidden, heads, vision hidden, vision heads, image size, patch, frames)
CONFIGS = {
    "hd32": (64, 2, 64, 2, 40, 8, None),        # 26 image tokens
    "hd64_odd_tokens": (128, 2, 128, 2, 36, 6, None),  # head_dim 64, 37 image tokens (prime)
    "hd40": (80, 2, 96, 3, 28, 7, None),         # head_dim 40 (text) / 32 (vision), 17 image tokens
    "video": (64, 2, 64, 2, 24, 8, 3),          # 3 frames x 10 tokens
    "hd512": (512, 8, 64, 2, 24, 8, None),      # decoder weights of 2^18 elements and up, 10 image tokens
}


def make_config(name: str, vocab: int = 150, layers: int = 2) -> GitConfig:
    h, heads, vh, vheads, image, patch, frames = CONFIGS[name]
    return GitConfig(
        vision_config=dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=layers,
                           num_attention_heads=vheads, image_size=image, patch_size=patch),
        hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers, num_attention_heads=heads,
        vocab_size=vocab, max_position_embeddings=64, num_image_with_embedding=frames,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )


def make_hf_model(name: str, seed: int = 0, lm_scale: float = 20.0, **kw) -> transformers.GitForCausalLM:
    """Random weights; the LM head is scaled so greedy choices are decisive, and the image projection
    amplified so captions depend on the image (random GIT models barely look at it otherwise)."""
    torch.manual_seed(seed)
    model = transformers.GitForCausalLM(make_config(name, **kw)).eval()
    with torch.no_grad():
        model.output.weight.mul_(lm_scale)
        model.git.visual_projection.visual_projection[1].weight.mul_(4.0)
        for layer in model.git.encoder.layer:  # sharper attention, so single image tokens matter
            layer.attention.self.query.weight.mul_(6.0)
            layer.attention.self.key.weight.mul_(6.0)
        if model.config.num_image_with_embedding:
            for p in model.git.img_temporal_embedding:
                p.normal_(std=0.5)
    return model


def pixels(name: str, batch: int, seed: int = 1) -> torch.Tensor:
    _, _, _, _, image, _, frames = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    shape = (batch, frames, 3, image, image) if frames else (batch, 3, image, image)
    return torch.randn(shape, generator=g)
