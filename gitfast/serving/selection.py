"""Token selection for the engine: per-sequence state, batch-invariant and reproducible.

Sequences come and go between steps (continuous batching), so nothing here depends on which other
sequences share a step:
- each running sequence owns a *slot* holding its state (tokens seen, for the repetition penalty;
  tokens generated, for `min_new_tokens`; its sampling seed);
- sampling draws Gumbel noise from a counter-based hash of (sequence seed, step, token id) instead of
  a global RNG stream, so a seeded caption is the same alone or in any batch, on CPU or GPU.
Processing follows transformers' order: repetition penalty, min-length EOS mask, temperature, top-k,
top-p; greedy is a plain argmax of the processed scores, exactly as transformers'.
"""
from __future__ import annotations

from typing import List

import torch

from . import logits as logits_steps
from .generation import Settings

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors (every product stays below 2**63)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` in a run seeded with `seed`."""
    t = torch.tensor([(seed & _MASK32) ^ ((index * 0x61C88647) & _MASK32)], dtype=torch.int64)
    return int(_mix32(_mix32(t) + (seed >> 32 & _MASK32))[0])


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) noise [B, vocab], a pure function of (seed, step, token id)."""
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    row = _mix32(seeds[:, None] ^ ((steps[:, None] * 0x61C88647) & _MASK32))
    bits = _mix32(row ^ ((tok * 0x2545F491) & _MASK32)) >> 8          # 24 random bits
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))         # strictly inside (0, 1)


def _grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with its first dimension extended to `rows` (new rows zero)."""
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:t.shape[0]] = t
    return out


class Selector:
    """Per-slot generation state and the choice of each next token."""

    def __init__(self, s: Settings, capacity: int, vocab: int, device, staging=None):
        self.s, self.vocab, self.device = s, vocab, device
        # host lists to the device: a staging.HostStaging (no host sync), else plain torch.tensor
        self._tensor = staging.tensor if staging is not None else (
            lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype, device=device))
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if s.eos:
            self.eos_mask[self._tensor(s.eos)] = True
        self.capacity = 0
        self.generated = torch.zeros(0, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(0, dtype=torch.int64, device=device)
        self.seen = (torch.zeros(0, vocab + 1, dtype=torch.bool, device=device)
                     if s.repetition_penalty != 1.0 else None)
        self.reserve(capacity)

    def reserve(self, slots: int) -> None:
        """Room for slots 0..slots-1 (the engine asks as it hands slots out, so a huge
        max_batch_size costs nothing until that many sequences run). Grows geometrically."""
        if slots <= self.capacity:
            return
        n = max(slots, 2 * self.capacity)
        self.generated, self.seeds = _grown(self.generated, n), _grown(self.seeds, n)
        if self.seen is not None:
            self.seen = _grown(self.seen, n)
        self.capacity = n

    def start(self, slot: int, prompt: List[int], seed: int) -> None:
        self.generated[slot] = 0
        self.seeds[slot] = seed
        if self.seen is not None:
            self.seen[slot] = False
            self.seen[slot, self._tensor(prompt)] = True

    def select(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Next token for each row of `logits` [B, vocab], row i belonging to slot slots[i]."""
        s = self.s
        seen = self.seen[slots, :-1] if self.seen is not None else None
        too_short = self.generated[slots] < s.min_new_tokens if s.min_new_tokens > 0 else None
        scores = logits_steps.process(logits.float(), s, seen=seen, too_short=too_short, eos_mask=self.eos_mask)
        if s.do_sample:
            u = uniform_noise(self.seeds[slots], self.generated[slots], scores.shape[-1])
            tokens = torch.argmax(scores - torch.log(-torch.log(u)), dim=-1)  # Gumbel-max: a draw from softmax
        else:
            tokens = torch.argmax(scores, dim=-1)
        self.generated[slots] += 1
        if self.seen is not None:
            self.seen[slots, tokens] = True
        return tokens
