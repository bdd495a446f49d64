"""Preparation in worker processes (`Captioner(num_workers=N)`, `gitfast.captioning.workers`): the same pixels and
tokens as inline preparation, results in input order, a bounded look-ahead, error records in place,
a dead worker costing only its own input, and JPEG draft decoding behind its switch."""
import functools
import itertools
import os

import pytest
import torch
from PIL import Image

from gitfast import Captioner
from gitfast.captioning.records import Source, file_source
from gitfast.captioning.workers import PreparePool, PrepareSpec
from image_factory import broken_files, encode, mode_images, rgb_array, write_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return write_files(str(folder), mode_images()), write_files(str(folder / "bad"), broken_files())


@pytest.fixture(scope="module")
def inline(checkpoint):
    return Captioner(checkpoint, device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def pooled(checkpoint):
    with Captioner(checkpoint, device="cpu", max_batch_size=4, num_workers=2, prefetch_batches=2) as c:
        yield c


def mixed_inputs(files, tmp_path):
    good, bad = files
    pil = Image.open(good[3])
    unpicklable = Source("lambda-source", lambda: open(good[4], "rb").read())
    return [good[0], bad[0], file_source(good[1]), pil, str(tmp_path / "missing.png"), unpicklable,
            bad[1], 42, *good[2:], bad[2], good[0]]


def test_workers_give_the_same_results_as_inline(inline, pooled, files, tmp_path):
    items = mixed_inputs(files, tmp_path)
    expected = inline.caption(items, max_new_tokens=6)
    assert sum(r.ok for r in expected) == 13 and sum(not r.ok for r in expected) == 5
    assert pooled.caption(items, max_new_tokens=6) == expected
    prompts = ["what color", None, "how many"] * 6
    assert pooled.caption(items, prompts[:len(items)], max_new_tokens=5) == inline.caption(
        items, prompts[:len(items)], max_new_tokens=5)
    assert pooled.caption(items[:6], max_new_tokens=4, num_beams=2) == inline.caption(
        items[:6], max_new_tokens=4, num_beams=2)


def test_pixels_from_workers_are_bit_identical(inline, pooled, files):
    good, _ = files
    local = inline.preparer
    jobs = [(i, path, None) for i, path in enumerate(good)]
    theirs = list(pooled.pool.map(iter(jobs), 5, local))
    ours = [local(*job, 5) for job in jobs]
    assert [p.index for p in theirs] == list(range(len(good)))
    for a, b in zip(theirs, ours):
        assert a.pixel_values.dtype == torch.float32 and torch.equal(a.pixel_values, b.pixel_values), a.source


def test_look_ahead_is_bounded_and_results_stay_in_order(pooled, files):
    good, _ = files
    pool = pooled.pool
    taken = []

    def lazy():
        for i in itertools.count():
            taken.append(i)
            yield i, good[i % len(good)], None

    assert pool.window == 2 * pooled.max_batch_size and pool.chunk == 2
    stream = pool.map(lazy(), 5, pooled.preparer)
    in_flight = []
    for k in range(30):
        assert next(stream).index == k
        in_flight.append(len(taken) - (k + 1))
    stream.close()
    assert max(in_flight) == pool.window - 1 and min(in_flight) >= pool.window - pool.chunk  # bounded, and ahead


def test_a_dead_worker_costs_only_its_own_input(inline, pooled, files, caplog):
    good, _ = files
    killer = Source("kills-its-worker", functools.partial(os._exit, 3))  # picklable, so it runs in a worker
    items = [good[0], good[1], killer, *good[2:6]]
    before = pooled.pool.restarts
    results = pooled.caption(items, max_new_tokens=5)
    assert [r.source for r in results] == [good[0], good[1], "kills-its-worker", *good[2:6]]
    assert "worker process died" in results[2].error
    assert [r for i, r in enumerate(results) if i != 2] == inline.caption(good[:6], max_new_tokens=5)
    assert pooled.pool.restarts == before + 2  # the pool that broke, and the retry that broke again
    assert pooled.caption(good[:2], max_new_tokens=5) == inline.caption(good[:2], max_new_tokens=5)


def test_bomb_limit_reaches_the_workers(pooled, files, monkeypatch):
    good, _ = files
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert all("decompression bomb" in r.error for r in pooled.caption(good[:3], max_new_tokens=5))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit at all
    assert all(r.ok for r in pooled.caption(good[:3], max_new_tokens=5))


def test_workers_that_cannot_start_raise(tmp_path):
    pool = PreparePool(PrepareSpec(str(tmp_path / "no-checkpoint"), 2, 48), 1, window=2)
    with pytest.raises(RuntimeError, match="failed to start"):
        list(pool.map([(0, "x.png", None)], 5, None))
    with pytest.raises(ValueError):
        PreparePool(PrepareSpec("x", 2, 48), 0, window=2)
    with pytest.raises(ValueError, match="num_workers"):
        Captioner(str(tmp_path), num_workers=-1)


def photo_jpeg(seed: int, size=(640, 480)) -> bytes:
    return encode(Image.fromarray(rgb_array(seed, (size[1], size[0]))), "JPEG", quality=90)


def test_jpeg_draft_is_a_switch_of_the_captioner(checkpoint, tmp_path):
    data = photo_jpeg(1)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)

    plain = Captioner(checkpoint, device="cpu", max_batch_size=2)
    draft = Captioner(checkpoint, device="cpu", max_batch_size=2, jpeg_draft=True)
    assert draft.preparer.draft == (32, 32) and plain.preparer.draft is None
    a, b = plain.preparer(0, str(path), None, 5), draft.preparer(0, str(path), None, 5)
    assert a.pixel_values.shape == b.pixel_values.shape == (1, 3, 32, 32)
    assert not torch.equal(a.pixel_values, b.pixel_values)  # not exact: it resizes from a smaller picture
    assert (a.pixel_values - b.pixel_values).abs().mean() < 0.1  # but the same picture
    assert draft.caption(str(path), max_new_tokens=5)[0].ok
