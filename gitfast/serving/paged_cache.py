"""The paged KV cache: device pools plus plain-Python block bookkeeping.

Each decoder layer has a K and a V pool `[num_blocks, block_size, heads, head_dim]`, preallocated
once from a memory budget. A sequence's tokens live in the blocks listed by its block table.

Sharing: GIT's image tokens attend only to each other, so an image's K/V (the *prefix*) are the same
for every prompt and every beam that uses it. The prefix is computed once into its own blocks; each
sequence refers to the full prefix blocks (reference counted) and gets a private copy of the last,
partly filled prefix block, into which its text continues. Blocks return to the free queue when the
last user lets go.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch

from .staging import HostStaging


class OutOfBlocks(RuntimeError):
    """Not enough free blocks right now (the scheduler waits for running sequences to finish)."""


class BlockAllocator:
    """Free queue + reference counts. Pure bookkeeping; knows nothing about tensors."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._ledger: Optional[Counter] = None  # references taken inside the open `lease`, by block

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> List[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        self._note(blocks, 1)
        return blocks

    def share(self, blocks: List[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is not allocated and cannot be shared")
        for b in blocks:
            self._refs[b] += 1
        self._note(blocks, 1)

    def free(self, blocks: List[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed more often than allocated")
            self._refs[b] -= 1
            self._note((b,), -1)
            if self._refs[b] == 0:
                self._free.append(b)

    def _note(self, blocks, change: int) -> None:
        if self._ledger is not None:
            for b in blocks:
                self._ledger[b] += change

    @contextmanager
    def lease(self) -> Iterator[None]:
        """Every reference taken inside the block and not given back by its end is freed there, however
        it ends: normally, by an exception (a bad input, out of memory, KeyboardInterrupt) or by a
        generator closed early. The engine runs each `run` in one lease, so a request that fails
        halfway (blocks taken, its sequence not yet running) gives back what it took in this one place.
        One lease at a time."""
        if self._ledger is not None:
            raise RuntimeError("a lease on this allocator is already open")
        self._ledger = ledger = Counter()
        try:
            yield
        finally:
            self._ledger = None
            self.free([b for b, n in ledger.items() for _ in range(max(n, 0))])

    def refcount(self, block: int) -> int:
        return self._refs[block]


@dataclass
class Prefix:
    """An image's K/V: `length` tokens in `blocks` (the last one possibly partial)."""
    length: int
    blocks: List[int]


@dataclass
class SeqBlocks:
    """One sequence's block table and how many tokens it holds."""
    table: List[int] = field(default_factory=list)
    length: int = 0
    shared: int = 0  # leading blocks borrowed from a prefix (not written by this sequence)


def private_blocks(block_size: int, prefix_len: int, total_len: int) -> int:
    """Blocks a sequence of `total_len` tokens takes for itself on top of a shared `prefix_len`-token
    prefix: all but the prefix's full blocks (a partly filled last prefix block is copied, so private)."""
    return math.ceil(total_len / block_size) - prefix_len // block_size


class KVBlocks:
    """The cache as bookkeeping: which blocks each prefix and sequence holds, through one allocator.
    Knows nothing about tensors, so the scheduler runs (and is tested) without a model."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def blocks_needed(self, prefix_len: int, total_len: int) -> int:
        """Private blocks a sequence of `total_len` tokens needs on top of a shared prefix."""
        return private_blocks(self.block_size, prefix_len, total_len)

    def new_prefix(self, length: int) -> Prefix:
        return Prefix(length, self.allocator.allocate(self.blocks_for(length)))

    def reserve_sequence(self, prefix: Prefix, total_len: int) -> SeqBlocks:
        """A sequence continuing `prefix`, with blocks for `total_len` tokens in all: the prefix's full
        blocks shared, the rest its own (the first of them takes a copy of a partly filled last prefix
        block: `PagedKVCache.copy_partial`)."""
        full = prefix.length // self.block_size
        private = self.allocator.allocate(self.blocks_needed(prefix.length, total_len))
        shared = prefix.blocks[:full]
        self.allocator.share(shared)
        return SeqBlocks(table=shared + private, length=prefix.length, shared=full)

    def release_prefix(self, prefix: Prefix) -> None:
        self.allocator.free(prefix.blocks)

    def release(self, seq: SeqBlocks) -> None:
        self.allocator.free(seq.table)
        seq.table = []

    def slots(self, seq: SeqBlocks, start: int, count: int) -> List[int]:
        """Cache slots (block * block_size + offset) for tokens start .. start+count-1 of `seq`."""
        bs = self.block_size
        return [seq.table[p // bs] * bs + p % bs for p in range(start, start + count)]

    def usage(self) -> Dict[str, int]:
        a = self.allocator
        return {"blocks": a.num_blocks, "free": a.num_free, "block_size": self.block_size}


class PagedKVCache(KVBlocks):
    """`KVBlocks` plus the pools its blocks index, and the device work on them."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        super().__init__(num_blocks, block_size)
        self.num_layers = num_layers
        shape = (num_blocks, block_size, heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.staging = HostStaging(device)  # index tensors to the device without a host sync

    @staticmethod
    def bytes_per_block(num_layers, block_size, heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_budget(cls, config, budget_bytes: int, block_size: int, dtype, device) -> "PagedKVCache":
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        per_block = cls.bytes_per_block(config.num_hidden_layers, block_size, heads, head_dim, dtype)
        n = int(budget_bytes // per_block)
        if n < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no {per_block}-byte block")
        return cls(config.num_hidden_layers, n, block_size, heads, head_dim, dtype, device)

    def start_sequence(self, prefix: Prefix, total_len: int) -> SeqBlocks:
        """`reserve_sequence` on a written prefix, its partial last block copied in."""
        seq = self.reserve_sequence(prefix, total_len)
        self.copy_partial(prefix, seq)
        return seq

    def copy_partial(self, prefix: Prefix, seq: SeqBlocks) -> None:
        """A partly filled last prefix block into `seq`'s first private block, where its text continues."""
        if prefix.length % self.block_size:
            self.copy_block(prefix.blocks[seq.shared], seq.table[seq.shared])

    def copy_block(self, src: int, dst: int) -> None:
        for pool in self.k + self.v:
            pool[dst].copy_(pool[src])

    def copy_private_blocks(self, seqs: List[SeqBlocks], sources: List[int]) -> None:
        """Beam reordering: sequence i takes the private contents of sequence sources[i].

        All sequences have the same layout (same prefix, same length), so this moves whole blocks:
        gather every source's private blocks first, then scatter, so overlapping moves are safe.
        """
        if not seqs:
            return
        src = self.staging.tensor([b for s in sources for b in seqs[s].table[seqs[s].shared:]])
        dst = self.staging.tensor([b for q in seqs for b in q.table[q.shared:]])
        for pool in self.k + self.v:
            pool[dst] = pool[src]

    def block_table_tensor(self, seqs: List[SeqBlocks], width: Optional[int] = None, device=None) -> torch.Tensor:
        width = width or max(len(s.table) for s in seqs)
        rows = [s.table + [0] * (width - len(s.table)) for s in seqs]
        if device is not None and torch.device(device) != self.k[0].device:
            return torch.tensor(rows, dtype=torch.int32, device=device)
        return self.staging.tensor(rows, torch.int32)
