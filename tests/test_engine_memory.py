"""The engine's memory follows what is queued, not max_batch_size (a bound that may be huge)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gitfast
from gitfast.serving.engine import Engine, KVCacheTooSmall, Request
from gitfast.serving.generation import resolve_settings
from git_factory import make_hf_model, pixels


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op produced while active, in bytes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model("hd64_odd_tokens")
    return hf, gitfast.GitForCausalLM.from_transformers(hf)


@pytest.mark.parametrize("penalty", [1.0, 1.3])  # 1.3: the per-slot seen-token table too
def test_a_huge_max_batch_size_on_two_requests_allocates_little(models, penalty):
    hf, fm = models
    px = pixels("hd64_odd_tokens", 2, seed=7)
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=8, repetition_penalty=penalty)
    reqs = [Request(px[i], [101]) for i in range(2)]
    small = Engine(fm.model, max_batch_size=2, block_size=16)
    ref = [o.token_ids for o in small.generate(reqs, s)]
    # a cap on the cache, so the old sizing (10**6 rows, capped by memory) stays harmless here
    huge = Engine(fm.model, max_batch_size=10**6, block_size=16, gpu_memory_fraction=0.02)
    with LargestTensor() as seen:
        out = [o.token_ids for o in huge.generate(reqs, s)]
    assert out == ref
    # per-slot state, pools and activations of two rows: well under a megabyte each
    assert seen.largest < 2**20, seen.largest
    assert huge.held_bytes() == small.held_bytes() == huge.budget_for(s, rows=2)
    if penalty == 1.0:
        expected = hf.generate(pixel_values=px, max_new_tokens=8)[:, 1:].tolist()
        assert all(o == e[:len(o)] for o, e in zip(out, expected))


def test_per_slot_state_grows_with_the_running_sequences(models):
    _, fm = models
    px = pixels("hd64_odd_tokens", 5, seed=8)
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=6)
    engine = Engine(fm.model, max_batch_size=10**6, block_size=16)
    outs = engine.generate([Request(px[i], [101]) for i in range(5)], s)
    alone = [Engine(fm.model, max_batch_size=1, block_size=16).generate([Request(px[i], [101])], s)[0]
             for i in range(5)]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert engine.held_bytes() == Engine(fm.model, max_batch_size=5).budget_for(s)


def test_a_request_no_memory_can_hold_is_a_clear_error(models):
    _, fm = models
    engine = Engine(fm.model, max_batch_size=4, block_size=16, gpu_memory_fraction=1e-12)
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=6)
    with pytest.raises(KVCacheTooSmall, match="one request needs .* bytes of KV cache"):
        engine.check_fits(s)  # before anything runs
    with pytest.raises(KVCacheTooSmall, match="one request needs"):
        engine.generate([Request(pixels("hd64_odd_tokens", 1)[0], [101])], s)
