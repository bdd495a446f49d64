"""The engine's lockstep mode: transformers' exact loops (beam search, its RNG stream when sampling) over
the same requests and the same KV cache as continuous batching."""
import pytest
import torch

import gitfast
from gitfast.serving.engine import Engine, Lockstep, Request
from gitfast.serving.generation import resolve_settings
from gitfast.serving.paged_cache import PagedKVCache
from gitfast.serving.paged_runner import PagedStepper
from git_factory import make_hf_model, pixels

NAME = "hd64_odd_tokens"


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model(NAME)
    return hf, gitfast.GitForCausalLM.from_transformers(hf)


def settings(fm, **kw):
    return resolve_settings(fm.generation_config, 1, **kw)


def all_free(engine):
    a = engine.cache.allocator
    return a.num_free == a.num_blocks


def test_beams_equal_transformers_and_the_rows_of_one_image_share_its_prefix(models, monkeypatch):
    hf, fm = models
    px = pixels(NAME, 2, seed=5)
    want = hf.generate(pixel_values=px.repeat(2, 1, 1, 1), max_new_tokens=6, num_beams=3)  # images 0, 1, 0, 1
    started, real = [], PagedKVCache.start_sequence

    def spy(cache, prefix, total):
        started.append(id(prefix))
        return real(cache, prefix, total)

    monkeypatch.setattr(PagedKVCache, "start_sequence", spy)
    engine = Engine(fm.model, max_batch_size=4, block_size=8)
    outs = engine.generate([Request(px[i % 2], [101], image_key=i % 2) for i in range(4)],
                           settings(fm, max_new_tokens=6, num_beams=3), lockstep=Lockstep(copies=3))
    assert torch.equal(torch.cat([o.sequences for o in outs]), want)
    assert len(started) == 12 and len(set(started)) == 2  # 4 requests x 3 beams on 2 image prefixes
    for o, row in zip(outs, want.tolist()):
        assert o.token_ids == row[1:1 + len(o.token_ids)] and o.sequences.shape[0] == 1
    assert all_free(engine)


def test_lockstep_borrows_the_engines_pools_grows_them_and_gives_every_block_back(models):
    hf, fm = models
    px = pixels(NAME, 2, seed=6)
    s_greedy = settings(fm, max_new_tokens=5)
    fresh = Engine(fm.model, max_batch_size=2, block_size=8)
    greedy = [o.token_ids for o in fresh.generate([Request(px[i], [101]) for i in range(2)], s_greedy)]
    one_block = fresh.bytes_per_block
    engine = Engine(fm.model, max_batch_size=2, block_size=8, kv_cache_bytes=one_block)  # far too small for 4 rows
    torch.manual_seed(7)
    want = hf.generate(pixel_values=px, max_new_tokens=5, do_sample=True, num_return_sequences=2)
    torch.manual_seed(7)
    s = settings(fm, max_new_tokens=5, do_sample=True, num_return_sequences=2)
    outs = engine.generate([Request(px[i], [101]) for i in range(2)], s, lockstep=Lockstep(copies=2))
    assert torch.equal(torch.cat([o.sequences for o in outs]), want)  # transformers' RNG stream
    assert engine.held_bytes() > one_block and all_free(engine)
    # the same pools then serve continuous batching, with the tokens a fresh engine gives
    assert [o.token_ids for o in engine.generate([Request(px[i], [101]) for i in range(2)], s_greedy)] == greedy


def test_an_interrupted_lockstep_run_gives_its_blocks_back_and_the_engine_serves_on(models, monkeypatch):
    hf, fm = models
    px = pixels(NAME, 2, seed=8)
    s = settings(fm, max_new_tokens=6, num_beams=2)
    engine = Engine(fm.model, max_batch_size=4, block_size=8)
    requests = [Request(px[i], [101]) for i in range(2)]
    want = [o.sequences for o in engine.generate(requests, s, lockstep=Lockstep(copies=2))]
    steps, real = [], PagedStepper.step

    def step(stepper, tokens):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real(stepper, tokens)

    monkeypatch.setattr(PagedStepper, "step", step)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(requests, s, lockstep=Lockstep(copies=2))
    monkeypatch.undo()
    assert all_free(engine)
    got = [o.sequences for o in engine.generate(requests, s, lockstep=Lockstep(copies=2))]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_beam_search_without_lockstep_is_refused_by_name(models):
    _, fm = models
    engine = Engine(fm.model, max_batch_size=2, block_size=8)
    with pytest.raises(ValueError, match="beam search runs in lockstep"):
        engine.generate([Request(pixels(NAME, 1)[0], [101])], settings(fm, max_new_tokens=3, num_beams=2))
