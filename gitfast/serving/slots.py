"""The engine's per-slot bookkeeping: which slot numbers running sequences hold, and how their chosen
tokens reach the host without stalling the device."""
from __future__ import annotations

import heapq
from typing import List

import torch


class Readback:
    """Chosen tokens to the host without stalling the device: on CUDA a non-blocking copy into one
    of two pinned buffers plus an event, waited for only after the next step has been queued."""

    def __init__(self, device: torch.device, capacity: int):
        self.cuda = device.type == "cuda"
        self.capacity = 0
        if self.cuda:
            self.buffers = []
            self.events = [torch.cuda.Event() for _ in range(2)]
            self.turn = 0
        self.reserve(capacity)

    def reserve(self, rows: int) -> None:
        """Room for `rows` tokens a step. A replaced buffer still being copied into stays alive
        through the pending step's view of it."""
        if rows <= self.capacity:
            return
        self.capacity = max(rows, 2 * self.capacity)
        if self.cuda:
            self.buffers = [torch.empty(self.capacity, dtype=torch.long, pin_memory=True) for _ in range(2)]

    def start(self, chosen: torch.Tensor):
        if not self.cuda:
            return chosen
        buf, event = self.buffers[self.turn][:chosen.shape[0]], self.events[self.turn]
        self.turn ^= 1  # the other buffer may still be read: its step's tokens are read after this launch
        buf.copy_(chosen, non_blocking=True)
        event.record()
        return buf, event

    def finish(self, handle) -> List[int]:
        if not self.cuda:
            return handle.tolist()
        buf, event = handle
        event.synchronize()
        return buf.tolist()


class Slots:
    """Slot numbers for running sequences: freed ones first (lowest first), then new ones, so the
    per-slot state grows with the sequences really running, never to max_batch_size up front."""

    def __init__(self):
        self.free: List[int] = []
        self.high = 0  # slots 0..high-1 have been handed out

    def take(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        self.high += 1
        return self.high - 1

    def give(self, slot: int) -> None:
        heapq.heappush(self.free, slot)
