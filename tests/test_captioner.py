"""gitfast.Captioner against transformers: same preprocessing (the checkpoint's processor), same tokens,
results in input order, one error record per bad input, batch invariant with mixed prompt lengths."""
import json
import os

import pytest
import torch
from PIL import Image

from gitfast import Captioner, CheckpointError
from gitfast.captioning import images
from gitfast.defaults import EMBEDDED_MODEL, EXAMPLES
from gitfast.captioning.records import Source, is_image_name
from gitfast.captioning.sources import expand
from image_factory import broken_files, mode_images, rgb_array, write_files

PROMPTS = ["what color is the shape?", None, "how many", "", "is there a big red circle on the left?", "what"]


@pytest.fixture(scope="module")
def reference(checkpoint):
    import transformers

    return (transformers.GitForCausalLM.from_pretrained(checkpoint).eval(),
            transformers.AutoProcessor.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return Captioner(checkpoint, device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return write_files(str(folder), mode_images()), write_files(str(folder / "bad"), broken_files())


def expected(reference, image, prompt=None, max_new_tokens=8, **kw):
    """transformers' GitForCausalLM.generate + the processor, as the GIT model card does it."""
    model, processor = reference
    pixel_values = processor(images=image, return_tensors="pt").pixel_values
    ids = [processor.tokenizer.cls_token_id]
    if prompt:
        ids += processor.tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(pixel_values=pixel_values, input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, **kw)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(model.config.eos_token_id)] if model.config.eos_token_id in new else new
    return new, processor.batch_decode(out[:, len(ids):], skip_special_tokens=True)[0]


def test_captions_equal_transformers_generate_and_processor(captioner, reference, files):
    good, _ = files
    results = captioner.caption(good, max_new_tokens=8)
    assert [r.source for r in results] == good
    texts = set()
    for path, r in zip(good, results):
        assert r.error is None, (path, r.error)
        ids, text = expected(reference, images.read(path))
        assert list(r.token_ids) == ids, path
        assert r.text == text, path
        texts.add(r.text)
    assert len(texts) > 2  # the pictures really differ in what the model says

    plain = Image.open(good[0])  # an RGB PNG straight through the processor, no gitfast code involved
    assert os.path.basename(good[0]) == "rgb.png" and plain.mode == "RGB"
    assert list(results[0].token_ids) == expected(reference, plain)[0]


def test_some_captions_stop_at_eos_and_others_at_the_limit(captioner, files):
    lengths = {len(r.token_ids) for r in captioner.caption(files[0], max_new_tokens=12)}
    assert 12 in lengths and min(lengths) < 12  # the EOS cut is exercised, mid-batch


def test_vqa_prompts_are_answered_and_left_out_of_the_text(captioner, reference, files):
    good, _ = files
    imgs = good[: len(PROMPTS)]
    results = captioner.caption(imgs, PROMPTS, max_new_tokens=6)
    for path, prompt, r in zip(imgs, PROMPTS, results):
        ids, text = expected(reference, images.read(path), prompt, max_new_tokens=6)
        assert (list(r.token_ids), r.text, r.prompt) == (ids, text, prompt), prompt
    assert results[0].token_ids != captioner.caption(imgs[0], max_new_tokens=6)[0].token_ids  # the prompt matters
    one_prompt = captioner.caption(imgs[:2], "what color", max_new_tokens=6)
    assert [r.token_ids for r in one_prompt] == [captioner.caption(p, "what color", max_new_tokens=6)[0].token_ids
                                                for p in imgs[:2]]


def test_batch_of_mixed_prompt_lengths_equals_one_at_a_time(checkpoint, captioner, files):
    good, _ = files
    prompts = (PROMPTS * 2)[: len(good)]
    batched = Captioner(checkpoint, device="cpu", max_batch_size=len(good)).caption(good, prompts, max_new_tokens=6)
    alone = [captioner.caption(path, prompt, max_new_tokens=6)[0] for path, prompt in zip(good, prompts)]
    assert batched == alone


def test_beam_search_matches_transformers(captioner, reference, files):
    good, _ = files
    for path, r in zip(good[:3], captioner.caption(good[:3], max_new_tokens=5, num_beams=3)):
        assert list(r.token_ids) == expected(reference, images.read(path), max_new_tokens=5, num_beams=3)[0]


def test_bad_inputs_give_error_records_in_place(captioner, files, tmp_path):
    good, bad = files
    mixed = [good[0], bad[0], good[1], bad[1], str(tmp_path / "missing.png"), bad[2], good[2]]
    results = captioner.caption(mixed, max_new_tokens=5)
    assert [r.source for r in results] == mixed
    errors = [r.error for r in results]
    assert [e is None for e in errors] == [True, False, True, False, False, False, True]
    assert "decode" in errors[1] and "empty" in errors[3] and "cannot read" in errors[4] and "not an image" in errors[5]
    assert all(r.text is None and r.token_ids == () for r in results if r.error)
    alone = captioner.caption([good[0], good[1], good[2]], max_new_tokens=5)
    assert [results[0], results[2], results[6]] == alone  # the failures did not disturb the others


def test_every_input_fails_without_raising(captioner, files):
    results = captioner.caption(files[1], max_new_tokens=5)
    assert len(results) == 3 and all(r.error for r in results)


def test_pil_images_sources_and_bombs(captioner, files, monkeypatch):
    good, _ = files
    pil = Image.open(good[3])  # LA: converted by the same rules as files
    src = Source("shard-0/000001", lambda: open(good[3], "rb").read())
    results = captioner.caption([pil, src, good[3], 42], max_new_tokens=5)
    assert [r.source for r in results[:3]] == ["<image 0>", "shard-0/000001", good[3]]
    assert results[0].token_ids == results[1].token_ids == results[2].token_ids
    assert "unsupported input type int" in results[3].error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert "decompression bomb" in captioner.caption(good[0], max_new_tokens=5)[0].error


def test_caption_iter_streams(captioner, files):
    good, _ = files
    taken = []

    def lazy():
        for path in good:
            taken.append(path)
            yield path

    stream = captioner.caption_iter(lazy(), max_new_tokens=5)
    first = next(stream)
    assert first.source == good[0] and len(taken) == captioner.max_batch_size
    assert [first] + list(stream) == captioner.caption(good, max_new_tokens=5)


def test_sources_from_a_folder_caption_in_walk_order(captioner, files):
    good, bad = files
    folder = os.path.dirname(good[0])
    results = list(captioner.caption_iter(expand([folder]), max_new_tokens=5))
    assert [r.source for r in results] == sorted(good) + sorted(bad)


def test_argument_errors_raise(captioner, files, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        captioner.caption(files[0][:3], ["a", "b"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        captioner.caption(files[0][:1], max_new_tokens=1000)
    with pytest.raises(CheckpointError, match="neither a local folder"):
        Captioner(str(tmp_path / "no-such-model"))
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(checkpoint, name), weights_only / name)
    with pytest.raises(CheckpointError, match="processor"):
        Captioner(str(weights_only))
    video = tmp_path / "video"
    video.mkdir()
    config = json.loads(open(os.path.join(checkpoint, "config.json")).read())
    (video / "config.json").write_text(json.dumps(dict(config, num_image_with_embedding=3)))
    with pytest.raises(CheckpointError, match="video checkpoint"):
        Captioner(str(video))
    with pytest.raises(ValueError, match="no CUDA GPU"):
        if torch.cuda.is_available():
            pytest.skip("has a GPU")
        Captioner(checkpoint, device="cuda")


@pytest.mark.skipif(not (EMBEDDED_MODEL / "model.safetensors").is_file(), reason="embedded model not trained yet")
def test_embedded_default_model_matches_transformers():
    import transformers

    examples = sorted(str(p) for p in EXAMPLES.glob("*") if is_image_name(p.name))[:4] if EXAMPLES.is_dir() else []
    inputs = examples or [Image.fromarray(rgb_array(s, (64, 64))) for s in range(2)]
    ref = (transformers.GitForCausalLM.from_pretrained(str(EMBEDDED_MODEL)).eval(),
           transformers.AutoProcessor.from_pretrained(str(EMBEDDED_MODEL)))
    results = Captioner(device="cpu").caption(inputs, max_new_tokens=12)
    for item, r in zip(inputs, results):
        assert r.error is None, r.error
        image = images.read(item) if isinstance(item, str) else item
        assert (list(r.token_ids), r.text) == expected(ref, image, max_new_tokens=12)
    if examples:
        assert all(r.text for r in results)  # the trained model describes its own example pictures


def test_seeded_sampling_does_not_depend_on_batching(checkpoint):
    from PIL import Image

    import gitfast

    folder = checkpoint
    imgs = [Image.new("RGB", (40, 30), (40 * i, 200 - 30 * i, 90)) for i in range(5)]
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, seed=5)
    one = gitfast.Captioner(folder, max_batch_size=1).caption(imgs, **kw)
    four = gitfast.Captioner(folder, max_batch_size=4).caption(imgs, **kw)
    assert [r.token_ids for r in one] == [r.token_ids for r in four]
    other = gitfast.Captioner(folder, max_batch_size=4).caption(imgs, **dict(kw, seed=6))
    assert [r.token_ids for r in other] != [r.token_ids for r in four]
