"""The engine: continuous batching, waiting for blocks, shared image prefixes, seeded sampling."""
import pytest
import torch

import gitfast
from gitfast.serving.engine import Engine, Request
from gitfast.serving.generation import resolve_settings
from gitfast.serving.selection import uniform_noise
from git_factory import make_hf_model, pixels


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model("hd64_odd_tokens")
    return hf, gitfast.GitForCausalLM.from_transformers(hf)


def settings(fm, **kw):
    return resolve_settings(fm.generation_config, 1, **kw)


def test_continuous_batching_with_sequences_ending_at_different_steps(models):
    hf, fm = models
    px = pixels("hd64_odd_tokens", 7, seed=3)
    free_run = hf.generate(pixel_values=px, max_new_tokens=10)
    # EOS tokens picked from the free-running captions so rows end after 2, 5, ... tokens or never
    eos = sorted({int(free_run[0, 3]), int(free_run[1, 6]), 102})
    ref = hf.generate(pixel_values=px, max_new_tokens=10, eos_token_id=eos)
    engine = Engine(fm.model, max_batch_size=3, block_size=8)  # fewer slots than requests
    outs = engine.generate([Request(px[i], [101]) for i in range(7)], settings(fm, max_new_tokens=10, eos_token_id=eos))
    lengths = set()
    for i, o in enumerate(outs):
        row = ref[i, 1:].tolist()
        n = len(o.token_ids)
        assert o.token_ids == row[:n] and all(t == 0 for t in row[n:])
        assert o.finish_reason == ("eos" if o.token_ids[-1] in eos else "length")
        lengths.add(n)
    assert len(lengths) >= 3, lengths
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks  # everything returned


def test_small_cache_waits_instead_of_failing(models):
    hf, fm = models
    px = pixels("hd64_odd_tokens", 5, seed=4)
    ref = hf.generate(pixel_values=px, max_new_tokens=6)
    # room for about two sequences at a time (37 image + 7 text tokens each, blocks of 8)
    per_block = 2 * 2 * 8 * 2 * 64 * 4
    engine = Engine(fm.model, max_batch_size=8, kv_cache_bytes=per_block * 14, block_size=8)
    outs = engine.generate([Request(px[i], [101]) for i in range(5)], settings(fm, max_new_tokens=6))
    assert [o.token_ids for o in outs] == ref[:, 1:].tolist()


def test_request_larger_than_cache_is_refused(models):
    _, fm = models
    engine = Engine(fm.model, max_batch_size=2, kv_cache_bytes=2 * 2 * 8 * 2 * 64 * 4 * 3, block_size=8)
    with pytest.raises(RuntimeError, match="request 0 needs more KV cache"):
        engine.generate([Request(pixels("hd64_odd_tokens", 1)[0], [101])], settings(fm, max_new_tokens=6))


def test_default_cache_is_sized_for_the_run_and_grows_when_needed(models):
    hf, fm = models
    px = pixels("hd64_odd_tokens", 6, seed=5)
    engine = Engine(fm.model, max_batch_size=4, block_size=8)
    assert engine.cache is None  # nothing allocated before the first run knows its lengths
    short = settings(fm, max_new_tokens=4)
    outs = engine.generate([Request(px[i], [101]) for i in range(6)], short)
    assert [o.token_ids for o in outs] == hf.generate(pixel_values=px, max_new_tokens=4)[:, 1:].tolist()
    held = engine.cache.allocator.num_blocks * engine.bytes_per_block
    assert held == engine.budget_for(short)
    # the whole batch at the position table's end would be far more than this run holds
    longest = fm.model.num_image_tokens + fm.config.max_position_embeddings
    assert held < 4 * -(-longest // 8) * engine.bytes_per_block
    first_cache = engine.cache
    engine.generate([Request(px[0], [101])], short)
    assert engine.cache is first_cache  # same needs: kept
    longer = settings(fm, max_new_tokens=40)
    out = engine.generate([Request(px[i], [101]) for i in range(6)], longer)
    assert engine.cache is not first_cache
    assert engine.cache.allocator.num_blocks * engine.bytes_per_block == engine.budget_for(longer)
    ref = hf.generate(pixel_values=px, max_new_tokens=40)[:, 1:].tolist()
    for o, row in zip(out, ref):
        n = len(o.token_ids)
        assert o.token_ids == row[:n] and all(t == 0 for t in row[n:])


def test_image_prefix_stops_at_the_last_layers_keys_and_values(models):
    """`encode_prefixes` caches the same K/V as a full decoder pass over the image tokens, without the
    last layer's attention output and MLP (nothing reads them: text attends through the cache)."""
    from gitfast import attention
    from gitfast.serving.paged_cache import PagedKVCache
    from gitfast.serving.paged_runner import PagedRunner

    _, fm = models
    m = fm.model
    with torch.no_grad():
        image = m.encode_images(pixels("hd64_odd_tokens", 2, seed=9))
        n = image.shape[1]
        shape = (m.config.num_hidden_layers, 32, 8, m.config.num_attention_heads, m.head_dim)
        ours = PagedKVCache(*shape, dtype=image.dtype, device=image.device)
        ran = []
        hook = m.layers[-1].fc1.register_forward_hook(lambda *a: ran.append(1))
        try:
            prefixes = PagedRunner(m, ours).encode_prefixes(image)
        finally:
            hook.remove()
        assert not ran, "the last layer's MLP ran over image tokens"
        full = PagedKVCache(*shape, dtype=image.dtype, device=image.device)
        slots = torch.tensor([p.blocks[t // 8] * 8 + t % 8 for p in prefixes for t in range(n)])
        meta = attention.AttentionMetadata(attention.PREFIX, slots, num_image=n)
        m.decode(image, lambda layer, q, k, v: attention.paged(q, k, v, full.k[layer], full.v[layer], meta))
    used = torch.tensor([b for p in prefixes for b in p.blocks])
    for layer in range(m.config.num_hidden_layers):
        assert torch.equal(ours.k[layer][used], full.k[layer][used]), layer
        assert torch.equal(ours.v[layer][used], full.v[layer][used]), layer


def test_shared_image_prefix_is_encoded_once(models, monkeypatch):
    hf, fm = models
    px = pixels("hd64_odd_tokens", 2, seed=5)
    questions = [[101, 5, 6], [101, 7], [101, 8, 9, 10], [101, 11]]
    calls = []
    real = fm.model.encode_images
    monkeypatch.setattr(fm.model, "encode_images", lambda p, *a: calls.append(p.shape[0]) or real(p, *a))
    reqs = [Request(px[i // 4], questions[i % 4], image_key=i // 4) for i in range(8)]
    outs = Engine(fm.model, max_batch_size=8, block_size=8).generate(reqs, settings(fm, max_length=12))
    assert sum(calls) == 2  # two images, eight questions
    for i, o in enumerate(outs):
        q = torch.tensor([questions[i % 4]])
        ref = hf.generate(pixel_values=px[i // 4: i // 4 + 1], input_ids=q, max_length=12)
        assert o.token_ids == ref[0, q.shape[1]:].tolist()[:len(o.token_ids)]


def test_video_and_text_only_requests():
    hf = make_hf_model("video")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("video", 3)
    ref = hf.generate(pixel_values=px, max_new_tokens=7)
    outs = Engine(fm.model, max_batch_size=2, block_size=4).generate(
        [Request(px[i], [101]) for i in range(3)], settings(fm, max_new_tokens=7))
    assert [o.token_ids for o in outs] == ref[:, 1:].tolist()
    ids = torch.tensor([[101, 5, 6]])
    ref = hf.generate(input_ids=ids, max_new_tokens=5)
    out = Engine(fm.model, max_batch_size=2, block_size=4).generate([Request(None, [101, 5, 6], max_new_tokens=5)],
                                                                     settings(fm, max_new_tokens=5))
    assert out[0].token_ids == ref[0, 3:].tolist()


def test_seeded_sampling_is_reproducible_and_batch_invariant(models):
    _, fm = models
    px = pixels("hd64_odd_tokens", 4, seed=6)
    s = settings(fm, max_new_tokens=8, do_sample=True, top_k=50, temperature=1.5)
    reqs = [Request(px[i], [101]) for i in range(4)]
    together = Engine(fm.model, max_batch_size=4, block_size=8).generate(reqs, s, seed=11)
    one_by_one = Engine(fm.model, max_batch_size=1, block_size=8).generate(reqs, s, seed=11)
    assert [o.token_ids for o in together] == [o.token_ids for o in one_by_one]
    other = Engine(fm.model, max_batch_size=4, block_size=8).generate(reqs, s, seed=12)
    assert [o.token_ids for o in other] != [o.token_ids for o in together]
    greedy = Engine(fm.model, max_batch_size=4, block_size=8).generate(reqs, settings(fm, max_new_tokens=8))
    top1 = Engine(fm.model, max_batch_size=4, block_size=8).generate(reqs, settings(fm, max_new_tokens=8, do_sample=True, top_k=1), seed=3)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_gumbel_sampling_follows_the_distribution():
    # 40,000 draws from a fixed 4-token distribution through the hash noise: frequencies within 1.5%
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40000
    seeds = torch.arange(n, dtype=torch.int64) * 7919
    u = uniform_noise(seeds, torch.zeros(n, dtype=torch.int64), 4)
    draws = torch.argmax(probs.log()[None, :] - torch.log(-torch.log(u)), dim=-1)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq
    assert 0.49 < float(u.mean()) < 0.51
