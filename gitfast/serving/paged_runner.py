"""GIT's decoder over the paged KV cache: image prefixes, prompt prefill, and decode steps.

Three phases, each one decoder pass with its own attention callback:
- `encode_prefixes`: the decoder over image tokens alone (they attend only to each other), writing
  their K/V into prefix blocks that many sequences may then share (`GitModel.decode_prefix`: the
  last layer stops at its K/V projection);
- `prefill`: the prompts of new sequences (packed, no padding), attending to their image prefix and
  causally to themselves;
- `decode`: one token per running sequence.
`PagedStepper` adapts a fixed group of sequences to the `step`/`reorder` interface of
`generation.py`'s loops (beam search and HF-compatible greedy).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import attention, quantization
from ..attention import AttentionMetadata
from . import image_chunks
from .paged_cache import PagedKVCache, Prefix, SeqBlocks


class PagedRunner:
    def __init__(self, model, cache: PagedKVCache, graphs=None):
        self.model, self.cache = model, cache
        self.device = cache.k[0].device
        self.graphs = graphs  # a cuda_graphs.DecodeGraphs, or None for eager decode steps

    def _tensor(self, values, dtype=torch.long):
        return self.cache.staging.tensor(values, dtype)

    def _decode(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decoder over `h` with every layer attending through the paged cache as `meta` says."""
        cache = self.cache
        return self.model.decode(h, lambda layer, q, k, v: attention.paged(q, k, v, cache.k[layer], cache.v[layer], meta))

    def encode_prefixes(self, image_tokens: torch.Tensor, prefixes: Optional[List[Prefix]] = None) -> List[Prefix]:
        """Decoder pass over `[N, I, hidden]` image tokens into one prefix per image: `prefixes` (blocks
        the scheduler took), else new ones; on the CPU in chunks of images (image_chunks). Returns the prefixes."""
        n, length = image_tokens.shape[:2]
        if prefixes is None:
            prefixes = [self.cache.new_prefix(length) for _ in range(n)]
        if length == 0:
            return prefixes
        step = image_chunks.per_pass(self.model, length, self.device) or n
        for i in range(0, n, step):
            self._prefix_pass(image_tokens[i:i + step], prefixes[i:i + step])
        return prefixes

    def _prefix_pass(self, image_tokens: torch.Tensor, prefixes: List[Prefix]) -> None:
        length, bs = image_tokens.shape[1], self.cache.block_size
        slots = self._tensor([p.blocks[t // bs] * bs + t % bs for p in prefixes for t in range(length)])
        meta, cache = AttentionMetadata(attention.PREFIX, slots, num_image=length), self.cache

        def store(layer, k, v):  # the last layer's keys and values: nothing reads its outputs
            attention.write_kv(k.flatten(0, 1), v.flatten(0, 1), cache.k[layer], cache.v[layer], slots)

        with quantization.image_rows():  # INT8 layers serve these rows with their image backend
            self.model.decode_prefix(
                image_tokens, lambda layer, q, k, v: attention.paged(q, k, v, cache.k[layer], cache.v[layer], meta),
                store)

    def prefill(self, seqs: List[SeqBlocks], prompts: Sequence[Sequence[int]], num_image: int) -> torch.Tensor:
        """Writes each sequence's prompt after its prefix; returns next-token logits [len(seqs), vocab]."""
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError("every sequence needs at least one prompt token (GIT starts captions with [CLS])")
        ids = self._tensor([t for p in prompts for t in p])
        positions = self._tensor([i for n in lens for i in range(n)])
        slots = self._tensor([s for seq, n in zip(seqs, lens) for s in self.cache.slots(seq, seq.length, n)])
        for seq, n in zip(seqs, lens):
            seq.length += n
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=self.device)
        cu[1:] = torch.cumsum(self._tensor(lens, torch.int32), 0)
        meta = AttentionMetadata(attention.PREFILL, slots, self.cache.block_table_tensor(seqs),
                                 self._tensor([s.length for s in seqs], torch.int32), cu, num_image,
                                 max_q=max(lens), max_context=max(s.length for s in seqs))
        h = self._decode(self.model.embed_text(ids, positions), meta)
        return self.model.lm_head(h[(cu[1:] - 1).long()])

    def decode(self, seqs: List[SeqBlocks], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Appends `tokens` [B] (text positions `positions`) to each sequence; returns logits [B, vocab]."""
        slots = self._tensor([self.cache.slots(s, s.length, 1)[0] for s in seqs])
        for s in seqs:
            s.length += 1
        meta = AttentionMetadata(attention.DECODE, slots, self.cache.block_table_tensor(seqs),
                                 self._tensor([s.length for s in seqs], torch.int32),
                                 max_context=max(s.length for s in seqs))
        return self.step(tokens, positions, meta)

    def step(self, tokens, positions, meta: AttentionMetadata) -> torch.Tensor:
        """A decode step from device inputs: replayed from a CUDA graph where one serves, else eager."""
        if self.graphs is not None:
            out = self.graphs.run(tokens, positions, meta)
            if out is not None:
                return out
        return self.decode_tensors(tokens, positions, meta)

    def decode_tensors(self, tokens, positions, meta: AttentionMetadata) -> torch.Tensor:
        """The decode step on device tensors only (no host work): what CUDA graphs capture."""
        return self.model.lm_head(self._decode(self.model.embed_text(tokens, positions), meta))


class SlotState:
    """The running sequences' decode inputs, kept on the device with one row per engine slot.

    The engine reserves a sequence's blocks when it starts, so its block table never changes: the
    row is written once. Each step gathers the running rows and advances them on the device, so the
    per-token host work is one small index tensor (cached while the running set is unchanged)
    instead of slots, lengths and block tables rebuilt from Python lists.
    """

    def __init__(self, cache: PagedKVCache, capacity: int, width: int):
        dev = cache.k[0].device
        self.cache, self.width, self.device = cache, width, dev
        self.capacity = 0
        self.tables = torch.zeros(0, width, dtype=torch.int32, device=dev)
        self.lengths = torch.zeros(0, dtype=torch.int32, device=dev)    # tokens in the cache
        self.positions = torch.zeros(0, dtype=torch.long, device=dev)   # text position of the next input
        self.tokens = torch.zeros(0, dtype=torch.long, device=dev)      # the next input token
        self._key, self._rows = None, None
        self.reserve(capacity)

    def reserve(self, slots: int) -> None:
        """Room for slots 0..slots-1, grown geometrically as the engine hands slots out."""
        if slots <= self.capacity:
            return
        n = max(slots, 2 * self.capacity)
        for name in ("tables", "lengths", "positions", "tokens"):
            old = getattr(self, name)
            new = torch.zeros((n, *old.shape[1:]), dtype=old.dtype, device=old.device)
            new[:old.shape[0]] = old
            setattr(self, name, new)
        self.capacity = n

    def start(self, rows: torch.Tensor, seqs: List[SeqBlocks], positions: List[int], tokens: torch.Tensor) -> None:
        """Sequences just prefilled into slots `rows` (a device index): their tables, lengths, next
        positions and first chosen tokens."""
        longest = max(len(s.table) for s in seqs)
        if longest > self.width:
            raise ValueError(f"a sequence holds {longest} blocks; the decode state has room for {self.width}")
        staging = self.cache.staging
        if not isinstance(rows, torch.Tensor):
            rows = staging.tensor(rows)
        self.tables[rows] = self.cache.block_table_tensor(seqs, self.width)
        self.lengths[rows] = staging.tensor([s.length for s in seqs], torch.int32)
        self.positions[rows] = staging.tensor(positions)
        self.tokens[rows] = tokens

    def rows(self, slots: Tuple[int, ...]) -> torch.Tensor:
        """The slots of this step's sequences as a device index (rebuilt only when they change)."""
        if slots != self._key:
            self._key, self._rows = slots, self.cache.staging.tensor(slots)
        return self._rows

    def inputs(self, rows: torch.Tensor, max_context: int):
        """(tokens, positions, attention metadata) for one decode step; `max_context` is the host's
        bound on the longest context after it."""
        lengths, tables = self.lengths[rows], self.tables[rows]
        bs = self.cache.block_size
        block = tables.gather(1, (lengths // bs).long()[:, None])[:, 0].long()
        slots = block * bs + (lengths % bs).long()
        meta = AttentionMetadata(attention.DECODE, slots, tables, lengths + 1, max_context=max_context)
        return self.tokens[rows], self.positions[rows], meta

    def advance(self, rows: torch.Tensor, context: torch.Tensor, positions: torch.Tensor,
                chosen: torch.Tensor) -> None:
        self.lengths[rows] = context
        self.positions[rows] = positions + 1
        self.tokens[rows] = chosen


class PagedStepper:
    """A fixed group of sequences stepped in lockstep (the interface `generation.py` drives)."""

    def __init__(self, runner: PagedRunner, seqs: List[SeqBlocks], next_positions: torch.Tensor):
        self.runner, self.seqs, self.positions = runner, seqs, next_positions

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.runner.decode(self.seqs, tokens, self.positions)
        self.positions = self.positions + 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        rows_list = rows.tolist()
        self.runner.cache.copy_private_blocks(self.seqs, rows_list)
        self.positions = self.positions[rows]

    def release(self) -> None:
        for s in self.seqs:
            self.runner.cache.release(s)
