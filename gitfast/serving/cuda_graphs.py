"""Decode steps replayed from CUDA graphs, captured once per bucketed batch size.

A decode step launches a few dozen small kernels per layer; at batch sizes of a few hundred the
launch overhead is most of the step. Each bucket (1, 2, 4, ... up to the engine's batch size) gets
one graph over static buffers: tokens, positions, cache slots, context lengths and block tables. A
step copies its inputs (tokens, positions and its `AttentionMetadata`) into the first rows of the
graphs' static ones; the remaining rows are inert (slot -1: nothing is written; context 0: no keys
are read) and their logits are ignored. Paged attention is
captured with the largest possible context (the block table's width), which bounds its split plan,
so one graph serves every step. If capturing fails, the engine logs it once and stays eager.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from ..attention import DECODE, AttentionMetadata

log = logging.getLogger(__name__)


def buckets(max_batch: int):
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks_per_seq: int):
        dev = runner.device
        self.runner, self.max_batch, self.width = runner, max_batch, max_blocks_per_seq
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        # the graphs' attention metadata: captured whole, refreshed in place before each replay
        self.meta = AttentionMetadata(
            DECODE, torch.full((max_batch,), -1, dtype=torch.long, device=dev),
            torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=dev),
            torch.zeros(max_batch, dtype=torch.int32, device=dev),
            max_context=max_blocks_per_seq * runner.cache.block_size)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.pool = None
        self.failed = False

    def _capture(self, n: int) -> None:
        args = (self.tokens[:n], self.positions[:n], self.meta.rows(n))
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (autotuning, lazy init)
            for _ in range(2):
                self.runner.decode_tensors(*args)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[n] = self.runner.decode_tensors(*args)
        self.pool = graph.pool()
        self.graphs[n] = graph

    def run(self, tokens, positions, meta: AttentionMetadata) -> Optional[torch.Tensor]:
        """Logits for the step, or None when graphs cannot serve it (the caller runs eagerly)."""
        n = tokens.shape[0]
        if self.failed or n > self.max_batch or meta.block_tables.shape[1] > self.width:
            return None
        bucket = next(b for b in buckets(self.max_batch) if b >= n)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.meta.copy_rows_(meta, bucket)
        if bucket not in self.graphs:
            try:
                self._capture(bucket)
            except Exception as exc:  # capture is an optimisation: never let it break generation
                log.warning("gitfast: CUDA graph capture failed (%s); decoding eagerly", exc)
                self.failed = True
                return None
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]
