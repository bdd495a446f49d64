"""Host syncs in the engine's loop: index tensors go to the device from pinned memory, non-blocking.

On the CPU a "device" copy cannot block, so these tests run the staging in its pinned mode on CPU
tensors (plain memory, fake events) and watch every route by which the engine could still sync:
`torch.tensor(..., device=...)` (a pageable copy the host waits for) and `.tolist()` (a device-to-host
read) anywhere in gitfast/serving. The GPU script checks the real thing under
`torch.cuda.set_sync_debug_mode("warn")` (bench/sync_check.py).
"""
import sys
from unittest import mock

import pytest
import torch

import gitfast
from gitfast.serving import paged_cache
from gitfast.serving.engine import Engine, Request
from gitfast.serving.generation import resolve_settings
from gitfast.serving.staging import HostStaging
from git_factory import make_hf_model, pixels


class FakeEvent:
    log = []

    def record(self):
        FakeEvent.log.append(("record", id(self)))

    def synchronize(self):
        FakeEvent.log.append(("synchronize", id(self)))


class RecordingStaging(HostStaging):
    """The pinned path on the CPU: tiny arenas (so they rotate), every device copy recorded."""
    made = []

    def __init__(self, device, **kw):
        super().__init__(device, arena_bytes=256, arenas=3, pinned=True, event_factory=FakeEvent)
        self.copies = []
        RecordingStaging.made.append(self)

    def _copy(self, dst, src):
        arenas = {a.untyped_storage().data_ptr() for a in self._arenas}
        self.copies.append(src.untyped_storage().data_ptr() in arenas)
        super()._copy(dst, src)


def test_staging_copies_non_blocking_from_its_arena_and_waits_only_when_lapping():
    FakeEvent.log.clear()
    s = HostStaging("cpu", arena_bytes=128, arenas=2, pinned=True, event_factory=FakeEvent)
    dst = mock.MagicMock()
    src = torch.arange(3)
    s._copy(dst, src)
    dst.copy_.assert_called_once_with(src, non_blocking=True)
    outs = [s.tensor(list(range(i, i + 10))) for i in range(6)]  # 80 B each: one per 128-B arena
    table = s.tensor([[1, 2, 3], [4, 5, 6]], torch.int32)
    big = s.tensor(list(range(100)))  # larger than an arena: the arena is replaced, after its wait
    assert [o.tolist() for o in outs] == [list(range(i, i + 10)) for i in range(6)]
    assert table.dtype == torch.int32 and table.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert big.tolist() == list(range(100)) and s.uploads == 8
    # each arena switch records the arena left; an arena is reused only after its own event
    recorded = [e for kind, e in FakeEvent.log if kind == "record"]
    waited = [e for kind, e in FakeEvent.log if kind == "synchronize"]
    assert len(recorded) == 7 and waited == recorded[:len(waited)] and len(waited) == 6
    assert HostStaging("cpu").tensor([1, 2]).tolist() == [1, 2]  # the CPU's own path: no staging


def test_the_engines_loop_never_waits_on_the_host(monkeypatch):
    hf = make_hf_model("hd64_odd_tokens")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd64_odd_tokens", 7, seed=3)
    free_run = hf.generate(pixel_values=px, max_new_tokens=10)
    eos = sorted({int(free_run[0, 3]), int(free_run[1, 6]), 102})  # rows end at different steps
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=10, eos_token_id=eos, repetition_penalty=1.2)
    reqs = [Request(px[i], [101, 7 + i]) for i in range(7)]
    expected = [o.token_ids for o in Engine(fm.model, max_batch_size=3, block_size=8).generate(reqs, s)]

    monkeypatch.setattr(paged_cache, "HostStaging", RecordingStaging)
    engine = Engine(fm.model, max_batch_size=3, block_size=8)
    pageable, reads = [], []
    real_tensor, real_tolist = torch.tensor, torch.Tensor.tolist

    def caller():
        f = sys._getframe(2)
        return f.f_code.co_name if "gitfast/serving" in f.f_code.co_filename.replace("\\", "/") else None

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None and caller():
            pageable.append(caller())
        return real_tensor(*args, **kwargs)

    def tolist(self):
        if caller():
            reads.append(caller())
        return real_tolist(self)

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    got = [o.token_ids for o in engine.generate(reqs, s)]
    monkeypatch.undo()

    assert got == expected and len({len(t) for t in got}) >= 3
    assert pageable == []            # no torch.tensor(..., device=...) left in the serving wing
    assert set(reads) == {"finish"}  # the only device-to-host read: the lagged, event-waited readback
    staging = engine.cache.staging
    assert staging is RecordingStaging.made[-1] and staging.uploads > 20
    assert staging.copies and all(staging.copies)  # every upload read from the arena
