"""Captioning on several devices at once: one spawned process per device, one writer.

`DevicePool` starts one process per device (the `spawn` start method: CUDA cannot be forked), each
with its own `Captioner`, and gives rank r the inputs `todo[r::n]` of the ordered to-do list — an
even split that needs no coordination. Ranks send their results back over one queue and the parent
writes them all through the same output as a single-device run. One writer is why every output kind
(stdout, JSONL, CSV, Parquet, --out-dir shards) works unchanged with several devices and keeps its
exactly-once guarantee under --resume: there are no per-rank part files to merge, and no merge step
that could itself be killed. Records are written as ranks finish them, so a single output file is not
in input order (per-shard outputs are sorted when each shard is finished).

A rank dies with its parent (Linux: PR_SET_PDEATHSIG; elsewhere a watcher thread), so a killed run
leaves no process behind still captioning while a resumed run starts. On Linux rank r is named
`gitfast-rank<r>` (ps, top, /proc/PID/comm). CPU ranks ("cpu,cpu", for
testing the split without GPUs) share the machine's cores between them.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from typing import Iterator, List, Optional, Sequence, Tuple

from .records import Source


class DeviceError(RuntimeError):
    """A rank could not start (bad device, model that does not load there): nothing was captioned."""


class RankDied(RuntimeError):
    """A rank stopped before finishing its inputs; what it sent before is written."""


def parse_devices(text: str) -> List[str]:
    """`0,1` / `cuda:0,cuda:1` / `all` (every visible GPU) / `cpu,cpu` -> torch device strings."""
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise ValueError(f"--devices {text!r}: empty entry; write e.g. 0,1 or all or cpu,cpu")
    if items == ["all"]:
        count = _cuda_count()
        if count == 0:
            raise ValueError("--devices all: no CUDA GPU is visible")
        return [f"cuda:{i}" for i in range(count)]
    devices = []
    for t in items:
        if t == "cpu":
            devices.append("cpu")
            continue
        index = t[len("cuda:"):] if t.startswith("cuda:") else t
        if not index.isdigit():
            raise ValueError(f"--devices: unknown device {t!r}; use GPU numbers (0,1), cuda:N, all, or cpu")
        count = _cuda_count()
        if int(index) >= count:
            raise ValueError(f"--devices: GPU {index} asked for, but {count} CUDA GPU(s) are visible")
        devices.append(f"cuda:{int(index)}")
    cuda = [d for d in devices if d != "cpu"]
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"--devices {text!r} names a GPU twice")
    return devices


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class DevicePool:
    """Ranks started on construction; `wait_ready()`, then iterate `results()`; `close()` always."""

    def __init__(self, devices: Sequence[str], todo: Sequence[Source], *, model, captioner_kwargs: Sequence[dict],
                 prompt, caption_kwargs: dict):
        """captioner_kwargs: the Captioner's keyword arguments for each device, in order."""
        ctx = multiprocessing.get_context("spawn")
        self.devices = list(devices)
        self.queue = ctx.Queue()
        n = len(self.devices)
        n_cpu = sum(d == "cpu" for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else None
        self.todo = list(todo)
        self.assigned = [len(todo[r::n]) for r in range(n)]
        self.received = [0] * n
        self.finished = [False] * n
        self._died: List[str] = []
        self._early: deque = deque()
        self.procs = []
        for r, device in enumerate(self.devices):
            args = (r, list(todo[r::n]), model, captioner_kwargs[r], prompt, caption_kwargs,
                    threads if device == "cpu" else None, os.getpid(), self.queue)
            p = ctx.Process(target=_rank_main, args=args, name=f"gitfast-rank{r}-{device}", daemon=True)
            p.start()
            self.procs.append(p)

    def wait_ready(self) -> None:
        """Blocks until every rank has its model loaded; DeviceError if one cannot start."""
        ready = set()
        while len(ready) < len(self.procs):
            msg = self._get(timeout=0.5)
            if msg is None:
                for r, p in enumerate(self.procs):
                    if r not in ready and not p.is_alive() and not self._drain_for(r, ready):
                        raise DeviceError(f"the process for device {self.devices[r]} exited (code {p.exitcode}) "
                                          "before its model was loaded")
                continue
            self._note_setup(msg, ready)

    def _drain_for(self, rank, ready) -> bool:
        """After rank's process has exited: read what it left in the queue; True if it got ready."""
        while rank not in ready:
            msg = self._get(timeout=0.2)
            if msg is None:
                return False
            self._note_setup(msg, ready)
        return True

    def _note_setup(self, msg, ready):
        kind, rank = msg[0], msg[1]
        if kind == "ready":
            ready.add(rank)
        elif kind == "fatal":
            raise DeviceError(f"device {self.devices[rank]}: {msg[2]}")
        else:
            self._early.append(msg)

    def results(self) -> Iterator[Tuple[Source, Optional[str], Optional[str]]]:
        """(source, text, error) as ranks finish them; RankDied at the end if a rank stopped early."""
        while self._early:
            yield from self._handle(self._early.popleft())
        while not all(self.finished):
            msg = self._get(timeout=0.5)
            if msg is not None:
                yield from self._handle(msg)
                continue
            for r, p in enumerate(self.procs):
                if not self.finished[r] and not p.is_alive():
                    # its last messages may still be in the pipe: read them before judging
                    while (msg := self._get(timeout=0.2)) is not None:
                        yield from self._handle(msg)
                    if not self.finished[r]:
                        self.finished[r] = True
                        missing = self.assigned[r] - self.received[r]
                        self._died.append(f"device {self.devices[r]} stopped (exit code {p.exitcode}) with "
                                          f"{missing} of its {self.assigned[r]} inputs not captioned")
        if self._died:
            raise RankDied("; ".join(self._died))

    def _handle(self, msg):
        kind, rank = msg[0], msg[1]
        if kind == "result":  # a rank's results come in its input order: todo[rank::n]
            source = self.todo[rank + self.received[rank] * len(self.procs)]
            self.received[rank] += 1
            yield source, msg[2], msg[3]
        elif kind == "done":
            self.finished[rank] = True
        elif kind in ("crash", "fatal"):
            self.finished[rank] = True
            missing = self.assigned[rank] - self.received[rank]
            self._died.append(f"device {self.devices[rank]} failed with {missing} inputs not captioned: {msg[2]}")

    def _get(self, timeout):
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        self.queue.close()
        self.queue.cancel_join_thread()  # nothing more is sent; do not wait on a dead rank's pipe


# --- inside a rank -------------------------------------------------------------------------------
def _rank_main(rank, sources, model, captioner_kwargs, prompt, caption_kwargs, threads, parent_pid, q):
    _die_with_parent(parent_pid)
    _name_process(f"gitfast-rank{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        from .captioner import Captioner

        captioner = Captioner(model, **captioner_kwargs)
    except Exception as exc:  # any setup failure is reported to the parent as this device's
        q.put(("fatal", rank, f"{type(exc).__name__}: {exc}"))
        return
    q.put(("ready", rank))
    try:
        for r in captioner.caption_iter(sources, prompt, **caption_kwargs):
            q.put(("result", rank, r.text, r.error))
    except Exception as exc:
        q.put(("crash", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    q.put(("done", rank))


def _name_process(name: str) -> None:
    """Shows the rank in `ps`, `top` and /proc/PID/comm (Linux), where every rank is otherwise `python`."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before we could ask to follow it
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="gitfast-parent-watch").start()
