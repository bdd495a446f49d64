"""Host-built index tensors (slots, positions, block tables) to the device without a host sync.

`torch.tensor(values, device="cuda")` copies from pageable memory: the CUDA runtime stages it through
its own pinned buffer and the host waits for the copy, i.e. for every kernel queued before it. The
engine builds a few such tensors per admission and one per change of the running set, so with
sequences ending at different steps that was most decode steps. `HostStaging` fills a preallocated
pinned arena instead and copies with `non_blocking=True`: the host only queues the copy.

A pinned byte must not be rewritten before the copy reading it has run. The arena is used bump-style
and, when full, the next of a small ring of arenas takes over; each arena records an event when it is
left, and is reused only after that event (normally long done: `arenas` rounds later). An arena too
small for a request is replaced by a larger one, after that wait, so no queued copy reads freed memory.
On the CPU there is nothing to stage: `tensor()` is plain `torch.tensor`.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

_ALIGN = 64  # bytes: each staged tensor starts on a cache line


class HostStaging:
    def __init__(self, device, arena_bytes: int = 1 << 16, arenas: int = 4, pinned: Optional[bool] = None,
                 event_factory: Optional[Callable[[], object]] = None):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda" if pinned is None else pinned
        self.uploads = 0  # tensors staged so far (tests and diagnostics)
        if not self.pinned:
            return
        self._new_event = event_factory or torch.cuda.Event
        self._pin = self.device.type == "cuda"  # a CPU "device" (tests) stages through plain memory
        self._arenas: List[torch.Tensor] = [self._arena(arena_bytes) for _ in range(arenas)]
        self._events: List[Optional[object]] = [None] * arenas
        self._turn, self._offset = 0, 0

    def _arena(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)

    def tensor(self, values, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """`torch.tensor(values, dtype=dtype)` on the device; queued, never waited for."""
        host = torch.tensor(values, dtype=dtype)
        if not self.pinned:
            return host if self.device.type == "cpu" else host.to(self.device)
        return self.upload(host)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A device copy of the CPU tensor `host`, through the pinned arena."""
        nbytes = host.numel() * host.element_size()
        staged = self._take(nbytes).view(host.dtype)[:host.numel()].view(host.shape)
        staged.copy_(host)
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self._copy(out, staged)
        self.uploads += 1
        return out

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def _take(self, nbytes: int) -> torch.Tensor:
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        if self._offset + size > self._arenas[self._turn].numel():
            self._next_arena(size)
        start, self._offset = self._offset, self._offset + size
        return self._arenas[self._turn][start:start + nbytes]

    def _next_arena(self, size: int) -> None:
        event = self._new_event()
        event.record()  # after every copy queued from the arena being left
        self._events[self._turn] = event
        self._turn = (self._turn + 1) % len(self._arenas)
        waiting = self._events[self._turn]
        if waiting is not None:
            waiting.synchronize()  # its copies ran long ago unless the ring was lapped within a step
            self._events[self._turn] = None
        if self._arenas[self._turn].numel() < size:
            self._arenas[self._turn] = self._arena(max(size, 2 * self._arenas[self._turn].numel()))
        self._offset = 0
