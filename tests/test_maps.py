"""Word maps (`gitfast.explain.maps`, `Captioner(return_maps=True)`, `gitfast caption --maps`): the contract,
the pointing game on held-out drawn pictures with the embedded model, and the PNGs."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gitfast.explain import maps
from gitfast.captioning.captioner import Captioner
from gitfast.captioning.maps_png import safe_name
from gitfast.defaults import EXAMPLES
from gitfast.training import pointing, shapes


@pytest.fixture(scope="module")
def captioner():
    return Captioner(device="cpu", max_batch_size=8)


def _check_contract(result, grid=(5, 5)):
    m = result.maps
    assert m.dtype == torch.float32 and m.shape == (len(result.token_ids), *grid)
    assert bool((m >= 0).all())
    torch.testing.assert_close(m.flatten(1).sum(1), torch.ones(len(result.token_ids)), atol=1e-5, rtol=0)


def test_maps_contract_one_row_per_token(captioner):
    files = sorted(str(p) for p in EXAMPLES.glob("*.png"))[:3]
    plain = captioner.caption(files + ["no-such-file.png"])
    results = captioner.caption(files + ["no-such-file.png"], return_maps=True)
    assert [r.text for r in results] == [r.text for r in plain]  # captions unchanged
    for r in results[:3]:
        _check_contract(r)
    assert results[3].error is not None and results[3].maps is None
    assert all(r.maps is None for r in plain)
    # each map row belongs to its own token: maps of one image alone equal those in a batch
    alone = captioner.caption(files[1], return_maps=True)[0]
    torch.testing.assert_close(alone.maps, results[1].maps, atol=1e-5, rtol=0)
    beams = captioner.caption(files[:2], num_beams=2, max_new_tokens=4, return_maps=True)
    for r in beams:
        assert len(r.token_ids) <= 4
        _check_contract(r)


def _maps_the_plain_way(captioner, inputs, results):
    """Maps as with_maps made them before reuse: each input prepared again, its image encoded again, and the
    decoder run with every layer's full probabilities (`maps.decoder_probs`), mean over layers and heads
    read at the predicting position."""
    out = []
    for i, (image, r) in enumerate(zip(inputs, results)):
        if not r.ok:
            out.append(None)
            continue
        p = captioner.preparer(i, image, None, 20)
        ids = torch.tensor([list(p.prompt_ids) + list(r.token_ids)])
        with torch.inference_mode():
            image_tokens = captioner.model.encode_images(p.pixel_values)
            _, probs = maps.decoder_probs(captioner.model, image_tokens, ids)
            rel = maps.relevance("mean", probs)[0]
        n_img = image_tokens.shape[1]
        rows = [n_img + len(p.prompt_ids) + k - 1 for k in range(len(r.token_ids))]
        out.append(maps._to_maps(rel[rows], n_img, maps.grid_of(captioner.model.config)))
    return out


@pytest.mark.parametrize("num_beams", [1, 2])
def test_maps_reuse_the_captioning_pass_and_equal_the_plain_way(captioner, num_beams):
    """with_maps reuses the captioning pass's pixels and image tokens, and word_maps computes only the
    text rows of the probabilities; the maps equal those of the full plain pass over freshly prepared
    inputs. Each image goes through the vision encoder once (no second encoding for the maps)."""
    pictures = [p[0] for p in pointing.held_out(19)]
    inputs = pictures[:7] + [b"not a picture"] + pictures[7:]  # 20 inputs, a failure among them, 3 batches of 8
    encoded = []
    hook = captioner.model.vision.register_forward_hook(lambda m, i, o: encoded.append(o.shape[0]))
    try:
        results = captioner.caption(inputs, return_maps=True, num_beams=num_beams, max_new_tokens=20)
    finally:
        hook.remove()
    assert sum(encoded) == 19 and results[7].maps is None and results[7].error
    assert not captioner.model.proj._forward_hooks  # with_maps' hook is gone after the run
    for r, expected in zip(results, _maps_the_plain_way(captioner, inputs, results)):
        if expected is not None:
            torch.testing.assert_close(r.maps, expected, atol=2e-6, rtol=0)


def test_maps_read_each_input_once(captioner):
    from gitfast.captioning.records import Source

    reads = {}

    def source(name):
        data = (EXAMPLES / name).read_bytes()

        def open_bytes():
            reads[name] = reads.get(name, 0) + 1
            return data
        return Source(name, open_bytes)

    names = sorted(p.name for p in EXAMPLES.glob("*.png"))[:10]
    results = captioner.caption([source(n) for n in names], return_maps=True)
    assert all(r.maps is not None for r in results)
    assert reads == {n: 1 for n in names}


@pytest.mark.parametrize("method", maps.METHODS)
def test_every_method_on_a_video_checkpoint(method):
    """Videos: [tokens, frames, grid_h, grid_w]; each frame's class token is dropped."""
    from git_factory import make_hf_model, pixels
    import gitfast

    model = gitfast.GitForCausalLM.from_transformers(make_hf_model("video")).model
    position = "predicting"
    out = maps.word_maps(model, pixels("video", 2), [[101], [101, 7]], [[5, 6, 9], [4]], method, position)
    assert [tuple(m.shape) for m in out] == [(3, 3, 3, 3), (1, 3, 3, 3)]
    for m in out:
        assert bool((m >= 0).all())
        torch.testing.assert_close(m.flatten(1).sum(1), torch.ones(m.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["hd32", "video"])
@pytest.mark.parametrize("method", ["mean", "raw"])
def test_text_relevance_is_the_text_rows_of_the_full_probabilities(name, method):
    """word_maps' fast path (only the text rows' probabilities, the last layer cut after its keys) reads
    what the full per-layer probabilities give, padded rows included."""
    from git_factory import make_hf_model, pixels
    import gitfast

    model = gitfast.GitForCausalLM.from_transformers(make_hf_model(name, layers=3) if name == "hd32"
                                                     else make_hf_model(name)).model
    ids = torch.tensor([[101, 5, 6, 9, 11], [101, 7, 4, 0, 0]])
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.inference_mode():
        image = model.encode_images(pixels(name, 2))
        n_img = image.shape[1]
        fast = maps.text_relevance(model, image, ids, text_mask, method)
        full = maps.relevance(method, maps.decoder_probs(model, image, ids, text_mask)[1])[:, n_img:, :n_img]
    torch.testing.assert_close(fast, full, atol=2e-6, rtol=0)


def test_vision_probs_rebuilds_encode_images(captioner):
    px = captioner.preparer(0, str(EXAMPLES / "shapes_00.png"), None, 20).pixel_values
    with torch.no_grad():
        tokens, probs = maps.vision_probs(captioner.model, px)
        torch.testing.assert_close(tokens, captioner.model.encode_images(px), atol=1e-5, rtol=1e-5)
    assert len(probs) == 3 and probs[0].shape == (1, 2, 26, 26)


def test_pointing_pictures_are_the_training_pictures():
    """pointing.draw_with_cells draws what shapes.draw_sample draws (same random stream)."""
    for seed in range(5):
        a, b = random.Random(seed), random.Random(seed)
        img, caption = shapes.draw_sample(a)
        img2, caption2, cells = pointing.draw_with_cells(b)
        assert caption == caption2 and np.array_equal(np.asarray(img), np.asarray(img2))
        assert len(cells) == int(caption.split()[0] == "one") * 1 + int(caption.split()[0] == "two") * 2 + \
            int(caption.split()[0] == "three") * 3


# Measured with the shipped method (mean attention, predicting position) on 200 held-out pictures
# (python -m gitfast.training.pointing --n 200; README "Word maps"): count 0%, size 90%, colour 100%,
# shape 100%; chance 8%. This test plays 40 of those pictures: bounds are the measurement minus 10
# points for size (40 words are a noisy sample of a 90% rate) and minus 5 for colour and shape. The
# count word misses the 90% goal (see README): its map is pinned at 0 here only as what was measured.
BOUNDS = {"count": 0.0, "size": 0.80, "colour": 0.95, "shape": 0.95}


def test_pointing_game_with_the_shipped_method(captioner):
    pictures = pointing.held_out(40)
    hits = {slot: [] for slot in pointing.SLOTS}
    for (img, caption, cells), r in zip(pictures, captioner.caption([p[0] for p in pictures], return_maps=True)):
        assert r.text == caption
        words = [captioner.tokenizer.decode([t]) for t in r.token_ids]
        for slot, hit in pointing.score(r.maps, words, cells):
            hits[slot].append(hit)
    accuracy = {slot: sum(h) / len(h) for slot, h in hits.items()}
    for slot, bound in BOUNDS.items():
        assert accuracy[slot] >= bound, (slot, accuracy)


def test_safe_names():
    taken = set()
    assert safe_name("photos/a cat.jpg", taken) == "photos_a_cat.jpg.png"
    assert safe_name("photos/a cat.jpg", taken) == "photos_a_cat.jpg-2.png"
    assert safe_name("shard.tar::k/../x\n", taken) == "shard.tar_k_.._x.png"
    assert safe_name("\udcff/..", taken) == "image.png"
    assert len(safe_name("x" * 1000)) <= 124


def test_cli_writes_readable_maps(tmp_path):
    out = tmp_path / "maps"
    pics = tmp_path / "in dir"
    pics.mkdir()
    for name in ("shapes_00.png", "shapes_03.png"):
        (pics / name).write_bytes((EXAMPLES / name).read_bytes())
    (pics / "broken.png").write_bytes(b"not a picture")
    run = subprocess.run([sys.executable, "-m", "gitfast.tools.cli", "caption", str(pics), "--maps", str(out), "--quiet",
                          "--out", str(tmp_path / "c.jsonl")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # the broken file is an error record, the rest captioned
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert sum(r["error"] is None for r in records) == 2
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == sorted(safe_name(str(pics / n)) for n in ("shapes_00.png", "shapes_03.png"))
    for name in pngs:
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.width > 300 and im.height > 200
