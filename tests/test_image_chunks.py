"""Vision-encoder and image-prefix passes in chunks of images on the CPU (serving/image_chunks.py): the
chunk size follows the activations' bytes, and chunked passes give exactly what one pass gives, in
captioning (the engine) and in the drop-in's generate (lockstep)."""
import pytest
import torch

import gitfast
from gitfast.serving import image_chunks
from gitfast.serving.engine import Engine, Request
from gitfast.serving.paged_runner import PagedRunner
from gitfast.serving.generation import resolve_settings
from git_factory import make_hf_model, pixels

NAME = "hd64_odd_tokens"


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model(NAME)
    return hf, gitfast.GitForCausalLM.from_transformers(hf)


def test_chunk_size_follows_the_widest_activation(models):
    _, fm = models
    c, v = fm.model.config, fm.model.config.vision_config
    widest = max(c.intermediate_size, v.intermediate_size, 3 * c.hidden_size, 3 * v.hidden_size)
    tokens = 37
    n = image_chunks.per_pass(fm.model, tokens, "cpu")
    assert n == image_chunks.TEMPORARY_BYTES // (4 * tokens * widest)
    assert 4 * n * tokens * widest <= image_chunks.TEMPORARY_BYTES < 4 * (n + 1) * tokens * widest
    assert image_chunks.per_pass(fm.model, 10 ** 9, "cpu") == 1  # never zero images
    assert image_chunks.per_pass(fm.model, tokens, "cuda") is None  # one pass on a GPU


def _two_images_per_pass(monkeypatch, model, tokens):
    c, v = model.config, model.config.vision_config
    widest = max(c.intermediate_size, v.intermediate_size, 3 * c.hidden_size, 3 * v.hidden_size)
    monkeypatch.setattr(image_chunks, "TEMPORARY_BYTES", 4 * 2 * tokens * widest)
    assert image_chunks.per_pass(model, tokens, "cpu") == 2


def test_chunked_passes_equal_one_pass(monkeypatch, models):
    hf, fm = models
    px = pixels(NAME, 5, seed=11)
    settings = resolve_settings(fm.generation_config, 1, max_new_tokens=6)
    with torch.inference_mode():
        one_pass = fm.model.encode_images(px)
        whole = Engine(fm.model, max_batch_size=8, block_size=8).generate([Request(px[i], [101]) for i in range(5)],
                                                                          settings)
        dropin_whole = fm.generate(pixel_values=px, max_new_tokens=6)
        _two_images_per_pass(monkeypatch, fm.model, fm.model.num_image_tokens)
        calls, prefix_calls = [], []
        real = fm.model.encode_images
        monkeypatch.setattr(fm.model, "encode_images", lambda p, *a: calls.append(p.shape[0]) or real(p, *a))
        real_pass = PagedRunner._prefix_pass
        monkeypatch.setattr(PagedRunner, "_prefix_pass",
                            lambda self, t, p: prefix_calls.append(t.shape[0]) or real_pass(self, t, p))
        assert torch.equal(image_chunks.encode_images(fm.model, px), one_pass)
        assert calls == [2, 2, 1]
        chunked = Engine(fm.model, max_batch_size=8, block_size=8).generate([Request(px[i], [101]) for i in range(5)],
                                                                            settings)
        assert calls[3:] == [2, 2, 1] and prefix_calls == [2, 2, 1]  # the engine's passes, chunked
        dropin_chunked = fm.generate(pixel_values=px, max_new_tokens=6)
        assert calls[6:] == [2, 2, 1] and prefix_calls[3:] == [2, 2, 1]
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    assert torch.equal(dropin_chunked, dropin_whole)
    assert torch.equal(dropin_whole, hf.generate(pixel_values=px, max_new_tokens=6))
