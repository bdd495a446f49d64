"""Decode steps replayed from CUDA graphs, captured once per bucketed batch size.

A decode step launches a few dozen small kernels per layer; at batch sizes of a few hundred the
launch overhead is most of the step. Each bucket (1, 2, 4, ... up to the engine's batch size) gets
one graph over static buffers: tokens, positions, cache slots, context lengths and block tables. A
step copies its inputs into the first rows of the buffers; the remaining rows are inert (slot -1:
nothing is written; context 0: no keys are read) and their logits are ignored. Paged attention is
captured with the largest possible context (the block table's width), which bounds its split plan,
so one graph serves every step. If capturing fails, the engine logs it once and stays eager.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

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
        self.max_context = max_blocks_per_seq * runner.cache.block_size
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=dev)
        self.context = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.pool = None
        self.failed = False

    def _capture(self, n: int) -> None:
        args = (self.tokens[:n], self.positions[:n], self.slots[:n], self.context[:n], self.tables[:n],
                self.max_context)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (autotuning, lazy init)
            for _ in range(2):
                self.runner.decode_tensors(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[n] = self.runner.decode_tensors(*args)
        self.pool = graph.pool()
        self.graphs[n] = graph

    def run(self, tokens, positions, slots, context, tables) -> Optional[torch.Tensor]:
        """Logits for the step, or None when graphs cannot serve it (the caller runs eagerly)."""
        n = tokens.shape[0]
        if self.failed or n > self.max_batch or tables.shape[1] > self.width:
            return None
        bucket = next(b for b in buckets(self.max_batch) if b >= n)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.slots[n:bucket].fill_(-1)
        self.context[:n].copy_(context)
        self.context[n:bucket].zero_()
        self.tables[:n, :tables.shape[1]].copy_(tables)
        if bucket not in self.graphs:
            try:
                self._capture(bucket)
            except Exception as exc:  # capture is an optimisation: never let it break generation
                log.warning("gitfast: CUDA graph capture failed (%s); decoding eagerly", exc)
                self.failed = True
                return None
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]
