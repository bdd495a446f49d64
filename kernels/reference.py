"""GIT's attention mask, and the plain-torch references of the attention operations: the ground truth
every backend (Triton, C++, plain torch) is tested against.

The mask is written here once: `git_visible` is the rule (key position j is visible to query
position i iff j < max(P, i + 1), P the image tokens: image tokens see the image only, text sees the
image and causally its text), `git_mask` its boolean matrix for SDPA and eager attention.
The references follow the kernels' contracts exactly (same layouts, same handling of skipped slots
and empty contexts) but compute in `compute_dtype` (fp32 by default; tests pass fp64 for a gold
standard) with one explicit score matrix per sequence, and cast the result back to the input dtype.
Loops over the batch in Python: clear, not fast.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch


def _image_counts(num_image_tokens, batch: int):
    if isinstance(num_image_tokens, torch.Tensor):
        if num_image_tokens.dim() == 0:
            return [int(num_image_tokens.item())] * batch
        return [int(x) for x in num_image_tokens.tolist()]
    return [int(num_image_tokens)] * batch


def git_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, num_image: int) -> torch.Tensor:
    """GIT's mask rule, broadcast over query positions `q_pos` and key positions `k_pos`: True where
    the key is visible, j < max(num_image, i + 1)."""
    return k_pos < torch.clamp(q_pos + 1, min=num_image)


def git_mask(num_image: int, queries: int, keys: int, text_mask: Optional[torch.Tensor] = None,
             device=None) -> torch.Tensor:
    """Boolean mask `[B or 1, 1, queries, keys]` (True = may attend) for the last `queries` of `keys`
    tokens laid out `[image | text]`. `text_mask` `[B, keys - num_image]` (0 = padding) hides padded
    text keys (a padded query still sees the image: harmless, its output is never used)."""
    k = torch.arange(keys, device=device)
    allowed = git_visible(k[keys - queries:, None], k[None, :], num_image)[None, None]
    if text_mask is not None:
        image = text_mask.new_ones(text_mask.shape[0], num_image)
        allowed = allowed & torch.cat([image, text_mask], dim=1).bool()[:, None, None, :]
    return allowed


def _prefix_lm_attention(q, k, v, q_pos, n_img, scale):
    """q `[n, H, D]` at absolute positions q_pos `[n]`; k, v `[L, H, D]` at positions 0..L-1."""
    allowed = git_visible(q_pos[:, None], torch.arange(k.shape[0], device=q.device)[None, :], n_img)  # [n, L]
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    s = s.masked_fill(~allowed[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hij,jhd->ihd", p, v)


def git_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    num_image_tokens: Union[int, torch.Tensor], max_seqlen: Optional[int] = None,
    sm_scale: Optional[float] = None, compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of `git_attention`: per sequence, key j visible to query i iff j < max(P, i+1)."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu = [int(x) for x in cu_seqlens.tolist()]
    counts = _image_counts(num_image_tokens, len(cu) - 1)
    out = torch.empty_like(q)
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        n_img = min(max(counts[b], 0), e - s)
        pos = torch.arange(e - s, device=q.device)
        o = _prefix_lm_attention(q[s:e].to(compute_dtype), k[s:e].to(compute_dtype),
                                 v[s:e].to(compute_dtype), pos, n_img, scale)
        out[s:e] = o.to(q.dtype)
    return out


def write_kv_cache_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference of `write_kv_cache`: cache[slot // bs, slot % bs] = new, skipping slot < 0."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def _gather(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, `[length, H, D]`, via its block table."""
    block_size = cache.shape[1]
    t = torch.arange(length, device=cache.device)
    blocks = table_row.long()[t // block_size]
    return cache[blocks, t % block_size]


def paged_decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, sm_scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of `paged_decode_attention`: q `[B, H, D]` sees all context_lens[b] tokens."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    for b, length in enumerate(int(x) for x in context_lens.tolist()):
        if length <= 0:
            continue  # no keys: the kernel writes zeros
        kk = _gather(k_cache, block_tables[b], length).to(compute_dtype)
        vv = _gather(v_cache, block_tables[b], length).to(compute_dtype)
        s = torch.einsum("hd,jhd->hj", q[b].to(compute_dtype), kk) * scale
        out[b] = torch.einsum("hj,jhd->hd", torch.softmax(s, dim=-1), vv).to(q.dtype)
    return out


def paged_prefill_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
    num_image_tokens: Union[int, torch.Tensor], sm_scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of `paged_prefill_attention`: the n new tokens of sequence b sit at positions
    context_lens[b]-n .. context_lens[b]-1 and see keys j < max(P, pos + 1)."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu = [int(x) for x in cu_seqlens_q.tolist()]
    lens = [int(x) for x in context_lens.tolist()]
    counts = _image_counts(num_image_tokens, len(cu) - 1)
    out = torch.empty_like(q)
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        length = lens[b]
        kk = _gather(k_cache, block_tables[b], length).to(compute_dtype)
        vv = _gather(v_cache, block_tables[b], length).to(compute_dtype)
        pos = torch.arange(length - (e - s), length, device=q.device)
        n_img = min(max(counts[b], 0), length)
        o = _prefix_lm_attention(q[s:e].to(compute_dtype), kk, vv, pos, n_img, scale)
        out[s:e] = o.to(q.dtype)
    return out
