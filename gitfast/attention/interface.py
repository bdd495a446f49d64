"""The one interface every attention backend implements, and the operations it is asked for.

A backend is one object in one file: `torch_backend` (plain torch: serves everything, autograd
included, and alone computes probabilities), `cpu_backend` (gitfast._C's C++ kernels) and
`triton_backend` (gitfast.kernels' Triton kernels, on CUDA). `selection.backend_for` is the one place
that picks one: the tensor's device decides which kernels may serve, the backend's `serves` says
whether they do for this operation and these inputs, and plain torch serves the rest. Callers never
pick a backend themselves.

Operations (`op`, what `serves` is asked about):
  VISION        `dense` with every token an image token: the vision encoder, and image prefixes
  DENSE         `dense` over whole unpadded `[image | text]` sequences with GIT's mask
  DENSE_PADDED  the same with padded text (a text mask): only plain torch serves it
  PREFILL       `prefill`: new text tokens over the paged KV cache, as an `AttentionMetadata` says
  DECODE        `decode`: one new token per sequence over the paged KV cache
  WRITE_KV      `write_kv`: new keys and values into their cache slots

Layouts are token-major like the cache: dense `[B, T, H, D]`; paged queries packed `[N, H, D]`
(prefill) or `[B, H, D]` (decode); pools `[num_blocks, block_size, H, D]`. GIT's mask and the
plain-torch reference every backend is tested against are `gitfast.kernels.reference`'s. Attention
probabilities are no backend operation: plain torch alone computes them (`torch_backend.probabilities`),
for word maps and `output_attentions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch

VISION, DENSE, DENSE_PADDED = "vision", "dense", "dense_padded"
PREFIX, PREFILL, DECODE = "prefix", "prefill", "decode"  # the phases of AttentionMetadata
WRITE_KV = "write_kv"
OPS = (VISION, DENSE, DENSE_PADDED, PREFILL, DECODE, WRITE_KV)

KERNEL_HEAD_DIMS = (16, 32, 64, 80, 96, 128)  # what the kernel backends are built and tested for


@dataclass
class AttentionMetadata:
    """Everything one decoder pass over the paged KV cache needs to attend, and nothing else: the
    only contract between the serving wing, which builds it, and the attention backends, which read
    it. A CUDA graph captures one whole; replaying refreshes its tensors in place (`copy_rows_`).

    phase `prefix`: image tokens [n, I] of new images, attending bidirectionally among themselves
    (no cache read); `prefill`: packed new text tokens of each sequence after its cached tokens;
    `decode`: one new token per sequence.
    """
    phase: str
    slot_mapping: torch.Tensor                    # [new tokens] int64: cache slot of each (-1: not written)
    block_tables: Optional[torch.Tensor] = None   # [B, W] int32: each sequence's blocks
    context_lens: Optional[torch.Tensor] = None   # [B] int32: tokens each sequence holds after this pass
    cu_seqlens_q: Optional[torch.Tensor] = None   # [B + 1] int32: new tokens of sequence i are [cu[i], cu[i+1]) (prefill)
    num_image: int = 0                            # image-prefix tokens of every sequence
    max_q: int = 1                                # host bounds (no device sync): longest new-token run,
    max_context: int = 0                          # longest context

    def copy_rows_(self, other: "AttentionMetadata", rows: int) -> None:
        """Refreshes the first `rows` sequences from `other` in place (a captured graph's inputs);
        the rest stay inert: no slot written, no key read."""
        n = other.slot_mapping.shape[0]
        self.slot_mapping[:n].copy_(other.slot_mapping)
        self.slot_mapping[n:rows].fill_(-1)
        self.context_lens[:n].copy_(other.context_lens)
        self.context_lens[n:rows].zero_()
        self.block_tables[:n, :other.block_tables.shape[1]].copy_(other.block_tables)

    def rows(self, n: int) -> "AttentionMetadata":
        """The first `n` sequences of a decode batch (views: a graph's static inputs stay shared)."""
        return AttentionMetadata(self.phase, self.slot_mapping[:n], self.block_tables[:n], self.context_lens[:n],
                                 None, self.num_image, self.max_q, self.max_context)


@runtime_checkable
class AttentionBackend(Protocol):
    """What the model and the serving wing may ask of a backend. Inputs that need autograd never
    reach a kernel backend (selection sends them to plain torch)."""

    name: str

    def serves(self, op: str, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> bool:
        """Whether this backend runs `op` for inputs like `x` (and the KV pool `cache`, for WRITE_KV)."""

    def dense(self, q, k, v, num_image: Optional[int] = None, text_mask: Optional[torch.Tensor] = None):
        """Attention over whole sequences `[B, T, H, D]`: the first `num_image` tokens see each other,
        text sees the image and causally its text (`text_mask` [B, T - num_image], 0 = padding, hides
        padded keys). `num_image` None: every token sees every token (the vision encoder)."""

    def prefill(self, q, k_pool, v_pool, meta) -> torch.Tensor:
        """New text tokens `[N, H, D]`, already written at the end of each sequence's cached context,
        attending to the image prefix and causally to their text (`meta.phase` PREFILL)."""

    def decode(self, q, k_pool, v_pool, meta) -> torch.Tensor:
        """One query per sequence `[B, H, D]` over its `meta.context_lens` cached tokens (none: zeros)."""

    def write_kv(self, k, v, k_pool, v_pool, slot_mapping) -> None:
        """Stores `k`, `v` `[N, H, D]` at `slot_mapping` (block * block_size + offset; negative:
        skipped), in place."""


def packed_dense(git_attention, q, k, v, num_image: Optional[int]) -> torch.Tensor:
    """`dense` for a kernel backend: `[B, T, H, D]` as B packed sequences of T tokens through its varlen
    `git_attention` (num_image None: all T tokens are image tokens)."""
    b, t = q.shape[:2]
    cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
    out = git_attention(q.reshape(b * t, *q.shape[2:]), k.reshape(b * t, *k.shape[2:]),
                        v.reshape(b * t, *v.shape[2:]), cu, t if num_image is None else num_image, max_seqlen=t)
    return out.view(q.shape)
