"""generate when things go wrong: a failed or interrupted call gives back every KV-cache block it took
and leaves the model as it was; threads sharing one model get the tokens each call gets alone; image
sizes and lengths transformers takes are served, the others refused by name (issue #27: 1, 2, 5, 9)."""
import sys
import threading

import pytest
import torch

import gitfast
from gitfast.serving.engine import Engine, Request
from gitfast.serving.generation import resolve_settings
from git_factory import make_hf_model, pixels


@pytest.fixture(scope="module")
def pair():
    hf = make_hf_model("hd32")
    return hf, gitfast.GitForCausalLM.from_transformers(hf)


def greedy(fm, px, **kw):
    return fm.generate(pixel_values=px, max_new_tokens=6, **kw)


def free_blocks(fm):
    return fm.gitfast_engine.cache.allocator.num_free


# --- 1. a failed or interrupted call gives back what it took ------------------------------------------
def test_a_failed_generate_gives_its_blocks_back(pair):
    _, fm = pair
    fm.free_kv_cache()
    px = pixels("hd32", 1)
    want = greedy(fm, px)
    engine, before = fm.gitfast_engine, free_blocks(fm)
    out_of_vocab = torch.tensor([[101, fm.config.vocab_size + 5]])
    for _ in range(3):
        with pytest.raises(IndexError):  # as transformers
            greedy(fm, px, input_ids=out_of_vocab)
        assert free_blocks(fm) == before
    assert fm.gitfast_engine is engine
    assert torch.equal(greedy(fm, px), want)


class Interrupt:
    """Replaces `owner.name` with a call that runs the real one `after` times, then raises `error`."""

    def __init__(self, monkeypatch, owner, name, error, after=0):
        self.real, self.error, self.left = getattr(owner, name), error, after
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        if self.left == 0:
            raise self.error
        self.left -= 1
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("where, error", [
    ("step", KeyboardInterrupt()),                            # mid-decode, sequences running
    ("decode_prefix", KeyboardInterrupt()),                   # prefix blocks taken, not yet written
    ("prefill", RuntimeError("CUDA out of memory")),          # sequences started, not yet running
], ids=["step", "prefix", "prefill"])
def test_an_interrupt_inside_the_engine_loop_gives_its_blocks_back(pair, monkeypatch, where, error):
    _, fm = pair
    fm.free_kv_cache()
    px = pixels("hd32", 3, seed=2)
    want = greedy(fm, px)
    engine, before = fm.gitfast_engine, free_blocks(fm)
    owner = fm.model if where == "decode_prefix" else engine.runner
    Interrupt(monkeypatch, owner, where, error, after=2 if where == "step" else 0)
    with pytest.raises(type(error)):
        greedy(fm, px)
    monkeypatch.undo()
    assert free_blocks(fm) == before
    assert fm.gitfast_engine is engine and torch.equal(greedy(fm, px), want)


def test_a_run_closed_early_gives_its_blocks_back(pair):
    _, fm = pair
    engine = Engine(fm.model, max_batch_size=2, block_size=8)
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=6, eos_token_id=None)
    px = pixels("hd32", 3, seed=4)
    run = engine.run([Request(px[i], [101]) for i in range(3)], s)
    next(run)  # one finished; the others hold blocks
    allocator = engine.cache.allocator
    assert allocator.num_free < allocator.num_blocks
    run.close()
    assert allocator.num_free == allocator.num_blocks


# --- 2. concurrent callers ------------------------------------------------------------------------------
@pytest.fixture
def frequent_thread_switches():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads' Python often, as a loaded server does
    yield
    sys.setswitchinterval(old)


def test_threads_sharing_one_model_get_the_tokens_each_call_gets_alone(pair, frequent_thread_switches):
    _, fm = pair
    # every call shares the model's one engine: greedy in its continuous mode, beam search (every 4th) in lockstep
    calls = [(pixels("hd32", 2, seed=10 + i), dict(num_beams=2) if i % 4 == 3 else {}) for i in range(8)]
    fm.free_kv_cache()
    alone = [greedy(fm, px, **kw) for px, kw in calls]
    fm.free_kv_cache()
    threads, per_thread = 4, 2
    got, errors = {}, []
    start = threading.Barrier(threads)

    def worker(t):
        start.wait()
        for j in range(per_thread):
            i = t * per_thread + j
            try:
                got[i] = greedy(fm, calls[i][0], **calls[i][1])
            except Exception as e:  # noqa: BLE001 - reported below, with the call that raised
                errors.append((i, repr(e)))

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    assert errors == []
    assert all(torch.equal(got[i], alone[i]) for i in range(len(calls)))
    assert free_blocks(fm) == fm.gitfast_engine.cache.allocator.num_blocks


def test_threads_sharing_one_engine_take_turns(pair, frequent_thread_switches):
    _, fm = pair
    engine = Engine(fm.model, max_batch_size=2, block_size=8)
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=6)
    batches = [[Request(p, [101]) for p in pixels("hd32", 2, seed=20 + i)] for i in range(6)]
    alone = [[o.token_ids for o in engine.generate(b, s)] for b in batches]
    got, errors = {}, []

    def worker(i):
        try:
            got[i] = [o.token_ids for o in engine.generate(batches[i], s)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    assert errors == [] and [got[i] for i in range(len(batches))] == alone
    # the same thread starting a second run while its first is open would wait for itself: refused
    run = engine.run(batches[0], s)
    next(run)
    with pytest.raises(RuntimeError, match="already in progress in this thread"):
        engine.generate(batches[1], s)
    run.close()
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


# --- 5. images of another size ----------------------------------------------------------------------------
@pytest.mark.parametrize("beams", [1, 2])
def test_interpolated_position_encoding_sizes_the_cache_from_the_image(pair, beams):
    hf, fm = pair
    big = torch.randn(2, 3, 120, 120, generator=torch.Generator().manual_seed(5))  # 226 image tokens, not 26
    kw = dict(pixel_values=big, interpolate_pos_encoding=True, max_new_tokens=6, num_beams=beams)
    assert torch.equal(fm.generate(**kw), hf.generate(**kw))


# --- 9. lengths and batches -------------------------------------------------------------------------------
def test_an_empty_batch_is_refused_by_name(pair):
    _, fm = pair
    with pytest.raises(ValueError, match="empty batch: pixel_values has 0 images"):
        fm.generate(pixel_values=pixels("hd32", 2)[:0], max_new_tokens=3)
    with pytest.raises(ValueError, match="empty batch: input_ids has 0 rows"):
        fm.generate(input_ids=torch.zeros(0, 1, dtype=torch.long), max_new_tokens=3)


def test_lengths_past_the_position_table_are_refused_by_name(pair):
    hf, fm = pair
    px = pixels("hd32", 1)
    positions = fm.config.max_position_embeddings  # 64: sequences of at most 65 tokens, as transformers'
    edge = dict(pixel_values=px, max_new_tokens=positions, eos_token_id=None)
    assert torch.equal(fm.generate(**edge), hf.generate(**edge))
    with pytest.raises(ValueError, match=r"max_new_tokens \(65\) runs past the model's 64 text positions.*"
                                         r"at most 64 new tokens"):
        fm.generate(pixel_values=px, max_new_tokens=positions + 1)
    with pytest.raises(ValueError, match=r"max_new_tokens \(1000000000\) runs past"):
        fm.generate(pixel_values=px, max_new_tokens=10**9)
    with pytest.raises(ValueError, match=r"min_new_tokens \(200\) runs past the model's 64 text positions"):
        fm.generate(pixel_values=px, min_new_tokens=200, max_new_tokens=300)
    with pytest.raises(ValueError, match=r"max_length \(100\) runs past"):
        fm.generate(pixel_values=px, max_length=100, num_beams=2)
