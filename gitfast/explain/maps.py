"""Which pixels each word came from: one map per generated token over the image's patch grid.

The caption is decoded again in one plain pass over `[image | prompt + generated tokens]`, with
attention probabilities computed here from the `attend(layer, q, k, v)` callback's q and k and GIT's
mask (`attention.git_mask`); nothing of the fast path changes, and this runs only when maps are asked.
A token's map is then read from those probabilities over the image's patch tokens (the class token of
each frame is dropped), clipped at zero and normalised to sum to 1. "mean" and "raw" need only the
text rows against the image columns: `text_relevance` computes just those (attention outputs from the
fused kernel), equal to the full probabilities' rows up to float rounding (~1e-6).

Methods (`METHODS`), each read at the token's own input position (`"own"`) or at the position whose
output predicted it (`"predicting"`):
  raw       last decoder layer's attention, mean over heads
  mean      attention averaged over layers and heads
  rollout   attention rollout (Abnar & Zuidema 2020): per layer 0.5 * mean-head attention + 0.5 * I,
            multiplied through the layers
  grad      gradient-weighted rollout (Chefer et al. 2021): per layer mean over heads of
            relu(dlogit/dA * A), accumulated R += A_bar @ R; the gradient is of the token's own logit,
            so it is read at the predicting position only
  rollout_vit  `rollout` over the decoder, continued through the vision encoder's layers (its attention
            rolled out the same way), so that relevance an image token gathered from other patches
            inside the ViT lands on those patches
Which one ships (`DEFAULT`) was chosen by a pointing game on drawn pictures
(`gitfast.training.pointing`; figures in the README).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import attention

METHODS = ("raw", "mean", "rollout", "grad", "rollout_vit", "input_grad")
POSITIONS = ("own", "predicting", "both")
GRADIENT = ("grad", "input_grad")
DEFAULT = ("mean", "predicting")   # measured best: README "Word maps", gitfast.training.pointing


def grid_of(config):
    """(frames or None, grid_h, grid_w) of a checkpoint's image tokens at its own image size."""
    v = config.vision_config
    g = v.image_size // v.patch_size
    return config.num_image_with_embedding, g, g


def decoder_probs(model, image: torch.Tensor, input_ids: torch.Tensor, text_mask: Optional[torch.Tensor] = None):
    """Runs the decoder over `[image | text]` on a plain path, keeping each layer's attention
    probabilities. image [B, I, W], input_ids [B, T] (right-padded, `text_mask` [B, T] 1 = real).
    Returns (hidden [B, I+T, W], probs: one [B, heads, I+T, I+T] float32 tensor per layer)."""
    n_img, t = image.shape[1], input_ids.shape[1]
    mask = attention.git_mask(n_img, n_img + t, n_img + t, text_mask, image.device)
    probs: List[torch.Tensor] = []

    def attend(layer, q, k, v):
        out, p = attention.probabilities(*(x.transpose(1, 2).float() for x in (q, k, v)), mask)  # [B, H, N, D]
        if p.requires_grad:
            p.retain_grad()
        probs.append(p)
        return out.transpose(1, 2).to(image.dtype)

    positions = torch.arange(t, device=input_ids.device).expand_as(input_ids)
    h = model.decode(torch.cat([image, model.embed_text(input_ids, positions)], dim=1), attend)
    return h, probs


def text_relevance(model, image: torch.Tensor, input_ids: torch.Tensor, text_mask: Optional[torch.Tensor],
                   method: str) -> torch.Tensor:
    """`relevance(method, decoder_probs(...)[1])[:, I:, :I]` for `method` "mean" or "raw", without the
    full probabilities: each layer's attention output comes from plain torch's fused SDPA
    (`attention.plain_torch`) under the same mask; probabilities (`attention.probabilities`) are computed
    only for the text queries, and of those only the image columns are kept, head-averaged.
    The last layer is run only as far as its queries and keys (its output is not needed).
    Returns [B, T, I] float32: T text positions (query n_img + t) x I image tokens."""
    n_img, t = image.shape[1], input_ids.shape[1]
    text_rows = attention.git_mask(n_img, t, n_img + t, text_mask, image.device)
    layers: List[torch.Tensor] = []

    def keep(q, k, v):  # [B, H, N, D] float32 -> the text rows' probabilities on the image, mean over heads
        layers.append(attention.probabilities(q[:, :, n_img:], k, v, text_rows)[1][..., :n_img].mean(1))  # [B, T, I]

    def attend(layer, q, k, v):
        q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))                    # [B, H, N, D]
        if method == "mean":
            keep(q, k, v)
        out = attention.plain_torch.dense(*(x.transpose(1, 2) for x in (q, k, v)), n_img, text_mask)
        return out.to(image.dtype)

    positions = torch.arange(t, device=input_ids.device).expand_as(input_ids)
    h = torch.cat([image, model.embed_text(input_ids, positions)], dim=1)
    for layer in model.layers[:-1]:
        h = layer(h, attend)
    keep(*(x.transpose(1, 2).float() for x in model.layers[-1].heads(h)))
    return layers[-1] if method == "raw" else torch.stack(layers).mean(0)


def vision_probs(model, pixel_values: torch.Tensor):
    """`model.encode_images`, also keeping the vision encoder's attention probabilities: (image tokens
    [B, I, W], one [B * frames, heads, P, P] float32 tensor per vision layer)."""
    probs: List[torch.Tensor] = []

    def attend(layer, q, k, v):  # ViT attention is unmasked
        out, p = attention.probabilities(*(x.transpose(1, 2).float() for x in (q, k, v)))  # [B, H, P, D]
        probs.append(p)
        return out.transpose(1, 2).to(q.dtype)

    return model.encode_images(pixel_values, attend=attend), probs


def _through_vision(rows: torch.Tensor, vision: Sequence[torch.Tensor], frames: Optional[int]) -> torch.Tensor:
    """Decoder relevance rows [B, T, I] over image tokens -> over the ViT's input tokens, per frame."""
    r = _rollout([p.mean(1) for p in vision])                  # [B * frames, P, P]
    f = frames or 1
    r = r.unflatten(0, (rows.shape[0], f))                      # [B, F, P, P]
    per_frame = rows.unflatten(-1, (f, r.shape[-1]))            # [B, T, F, P]
    return torch.einsum("btfp,bfpq->btfq", per_frame, r).flatten(-2)


def _rollout(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout of per-layer [B, N, N] (head-averaged) matrices."""
    eye = torch.eye(layers[0].shape[-1], device=layers[0].device)
    r = eye.expand_as(layers[0])
    for a in layers:
        a = 0.5 * a + 0.5 * eye
        r = (a / a.sum(-1, keepdim=True)) @ r
    return r


def relevance(method: str, probs: Sequence[torch.Tensor], grads: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """[B, N, N]: how much each query position draws on each key position, by `method`."""
    if method == "raw":
        return probs[-1].mean(1)
    if method == "mean":
        return torch.stack([p.mean(1) for p in probs]).mean(0)
    if method == "rollout":
        return _rollout([p.mean(1) for p in probs])
    if method == "grad":
        eye = torch.eye(probs[0].shape[-1], device=probs[0].device)
        r = eye.expand_as(probs[0][:, 0]).clone()
        for p, g in zip(probs, grads):
            r = r + (g * p).clamp(min=0).mean(1) @ r
        return r
    raise ValueError(f"unknown map method {method!r}; choose from {', '.join(METHODS)}")


def _patch_columns(n_img: int, frames: Optional[int]) -> torch.Tensor:
    """Indices of the patch tokens in the image prefix (each frame's class token dropped)."""
    per = n_img // (frames or 1)
    idx = torch.arange(n_img).view(frames or 1, per)[:, 1:]
    return idx.reshape(-1)


def _to_maps(rows: torch.Tensor, n_img: int, grid) -> torch.Tensor:
    """[T, N] relevance rows -> [T, (frames,) gh, gw], non-negative, each summing to 1."""
    frames, gh, gw = grid
    if rows.ndim == 3:
        rows = rows.mean(1)
    m = rows[:, _patch_columns(n_img, frames).to(rows.device)].clamp(min=0).float()
    total = m.sum(-1, keepdim=True)
    m = torch.where(total > 0, m / total.clamp(min=1e-30), torch.full_like(m, 1.0 / m.shape[-1]))
    shape = (m.shape[0], frames, gh, gw) if frames else (m.shape[0], gh, gw)
    return m.reshape(shape).cpu()


def word_maps(model, pixel_values: torch.Tensor, prompt_ids: Sequence[Sequence[int]],
              token_ids: Sequence[Sequence[int]], method: str = DEFAULT[0], position: str = DEFAULT[1],
              image: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """One map tensor per sample: row i for `token_ids[b][i]`, shaped [len, gh, gw] (videos
    [len, frames, gh, gw]), float32 on the CPU. `prompt_ids[b]` starts with [CLS]; `token_ids[b]` are
    the generated ids after it (no EOS). `image`: the projected image tokens if already computed (then
    `pixel_values` is read only by "rollout_vit" and "input_grad" and may be None otherwise)."""
    if position not in POSITIONS:
        raise ValueError(f"unknown map position {position!r}; choose from {', '.join(POSITIONS)}")
    if method in GRADIENT and position != "predicting":
        raise ValueError("gradient-weighted maps are read at the predicting position only")
    b = len(token_ids)
    params = next(model.parameters())
    dev, dtype = params.device, params.dtype
    seqs = [list(p) + list(t) for p, t in zip(prompt_ids, token_ids)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(b, width, dtype=torch.long)
    text_mask = torch.zeros(b, width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        text_mask[row, :len(s)] = 1
    ids, text_mask = ids.to(dev), text_mask.to(dev)
    grid = grid_of(model.config)

    with torch.inference_mode(method not in GRADIENT), torch.enable_grad() if method in GRADIENT else torch.no_grad():
        vision = None
        if method == "rollout_vit":  # the image tokens come with the ViT's attention
            image, vision = vision_probs(model, pixel_values.to(dev, dtype))
        elif image is None:
            image = model.encode_images(pixel_values.to(dev, dtype))
        if method == "input_grad":
            return _input_grad_maps(model, pixel_values.to(dev, dtype), ids, text_mask, prompt_ids, token_ids, grid)
        image = image.detach().requires_grad_(method == "grad")
        n_img = image.shape[1]
        # query row of token i of sample b: its own input position, or the one before it
        shift = 0 if position == "own" else 1
        rows = [[n_img + len(p) + i - shift for i in range(len(t))] for p, t in zip(prompt_ids, token_ids)]
        if position == "both":
            rows = [[[r, r + 1] for r in row] for row in rows]  # (predicting, own), averaged in _to_maps
        if vision is not None:
            _, probs = decoder_probs(model, image, ids, text_mask)
            rel = relevance("rollout", probs)[:, :, :n_img]
            rel = _through_vision(rel, vision, grid[0])
            return [_to_maps(rel[s, rows[s]], n_img, grid) for s in range(b)]
        if method in ("mean", "raw"):  # only the text rows against the image columns are needed
            rel = text_relevance(model, image, ids, text_mask, method)          # [B, T, n_img]
            return [_to_maps(rel[s, torch.tensor(rows[s], dtype=torch.long) - n_img], n_img, grid) for s in range(b)]
        if method != "grad":
            _, probs = decoder_probs(model, image, ids, text_mask)
            rel = relevance(method, probs)
            return [_to_maps(rel[s, rows[s]], n_img, grid) for s in range(b)]
        return _grad_maps(model, image, ids, text_mask, rows, token_ids, n_img, grid)


def _grad_maps(model, image, ids, text_mask, rows, token_ids, n_img, grid) -> List[torch.Tensor]:
    """One backward pass per token index (all samples at once: their logits do not mix)."""
    out = [[] for _ in token_ids]
    longest = max((len(t) for t in token_ids), default=0)
    for i in range(longest):
        h, probs = decoder_probs(model, image, ids, text_mask)
        live = [s for s in range(len(token_ids)) if i < len(token_ids[s])]
        q = torch.tensor([rows[s][i] for s in live], device=h.device)
        tok = torch.tensor([token_ids[s][i] for s in live], device=h.device)
        logits = model.lm_head(h[live, q])
        logits.gather(1, tok[:, None]).sum().backward()
        with torch.no_grad():
            rel = relevance("grad", [p.detach() for p in probs], [p.grad for p in probs])
            for j, s in enumerate(live):
                out[s].append(rel[s, q[j]])
    return [_to_maps(torch.stack(r), n_img, grid) if r else _empty(grid) for r in out]


def _input_grad_maps(model, pixels, ids, text_mask, prompt_ids, token_ids, grid) -> List[torch.Tensor]:
    """|d logit / d pixel * pixel| summed over each patch's pixels and channels (one backward per token index)."""
    frames, gh, gw = grid
    pixels = pixels.detach().requires_grad_(True)
    image = model.encode_images(pixels)
    n_img = image.shape[1]
    h, _ = decoder_probs(model, image, ids, text_mask)
    out = [[] for _ in token_ids]
    longest = max((len(t) for t in token_ids), default=0)
    for i in range(longest):
        live = [s for s in range(len(token_ids)) if i < len(token_ids[s])]
        q = torch.tensor([n_img + len(prompt_ids[s]) + i - 1 for s in live], device=h.device)
        tok = torch.tensor([token_ids[s][i] for s in live], device=h.device)
        (g,) = torch.autograd.grad(model.lm_head(h[live, q]).gather(1, tok[:, None]).sum(), pixels, retain_graph=True)
        sal = (g * pixels).abs().sum(-3)                              # [B, (F,) H, W]
        sal = sal.unflatten(-2, (gh, -1)).unflatten(-1, (gw, -1)).sum((-3, -1))  # per patch
        for j, s in enumerate(live):
            out[s].append(sal[s].detach().float().flatten())
    return [_norm(torch.stack(r), grid) if r else _empty(grid) for r in out]


def _norm(m: torch.Tensor, grid) -> torch.Tensor:
    frames, gh, gw = grid
    m = m / m.sum(-1, keepdim=True).clamp(min=1e-30)
    return m.reshape((m.shape[0], frames, gh, gw) if frames else (m.shape[0], gh, gw)).cpu()


def _empty(grid) -> torch.Tensor:
    frames, gh, gw = grid
    return torch.zeros((0, frames, gh, gw) if frames else (0, gh, gw))
