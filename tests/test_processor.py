"""gitfast.checkpoint.processor: transformers' pixels without transformers' processing stack, and a captioning path
that stays light (issue #25: seconds of start-up were transformers' modeling stack)."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from gitfast.checkpoint import loading, processor
from gitfast.captioning import images
from gitfast.defaults import EMBEDDED_MODEL, EXAMPLES
from image_factory import mode_images

CLIP = {"image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
SETTINGS = {
    "embedded": None,  # the embedded model's own preprocessor_config.json
    "hub_224": {**CLIP, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
    "legacy_ints": {"feature_extractor_type": "CLIPFeatureExtractor", "size": 40, "crop_size": 32, "resample": 3},
    "small_crop": {**CLIP, "size": {"shortest_edge": 37}, "crop_size": {"height": 29, "width": 21}},
    "bilinear_scalar_norm": {**CLIP, "resample": 2, "image_mean": 0.5, "image_std": 0.25,
                             "size": {"shortest_edge": 31}, "crop_size": {"height": 31, "width": 31}},
    "defaults": {"image_processor_type": "CLIPImageProcessor"},
}
# (width, height): square, portrait, landscape, smaller than the crop (upscaled), extreme strips
SIZES = [(80, 80), (81, 200), (300, 97), (17, 5), (1, 400), (513, 2), (640, 480)]
# pixels reproducing transformers' preprocessing exactly; deliberately noisy so any resize difference shows
RNG = np.random.default_rng(25)
PICTURES = [Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
PICTURES += [images.decode(data) for data in mode_images().values()]  # every mode, through gitfast's to_rgb


def _folder(tmp_path, name):
    if SETTINGS[name] is None:
        return EMBEDDED_MODEL
    (tmp_path / processor.PREPROCESSOR_FILE).write_text(json.dumps(SETTINGS[name]))
    return tmp_path


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_pixels_are_bit_identical_to_transformers_processor(tmp_path, name):
    from transformers import AutoImageProcessor

    folder = _folder(tmp_path, name)
    ours = processor.clip_pixels(processor.image_settings(folder))
    assert isinstance(ours, processor.ClipPixels)
    theirs = AutoImageProcessor.from_pretrained(str(folder))
    for picture in PICTURES:
        expected = theirs(images=picture, return_tensors="pt").pixel_values
        got = ours(picture)
        assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape, (picture.size, got.shape)
        assert got.is_contiguous()
        assert torch.equal(got, expected), (picture.size, (got - expected).abs().max().item())


@pytest.mark.parametrize("change", [{"do_center_crop": False}, {"crop_size": {"height": 48, "width": 48}},
                                    {"size": {"shortest_edge": 32, "longest_edge": 64}},
                                    {"image_processor_type": "BlipImageProcessor"}, {"use_square_size": True},
                                    {"size": 32, "default_to_square": True}])
def test_settings_it_does_not_reproduce_are_left_to_transformers(tmp_path, change):
    settings = {**SETTINGS["hub_224"], "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    assert processor.clip_pixels({**settings, **change}) is None
    assert isinstance(processor.clip_pixels(settings), processor.ClipPixels)


def test_settings_nested_in_processor_config_win_as_in_transformers(tmp_path):
    (tmp_path / processor.PREPROCESSOR_FILE).write_text(json.dumps(SETTINGS["hub_224"]))
    (tmp_path / processor.PROCESSOR_FILE).write_text(json.dumps({"image_processor": SETTINGS["small_crop"]}))
    assert processor.image_settings(tmp_path) == SETTINGS["small_crop"]


def test_load_processor_gives_transformers_pixels_and_tokens():
    from transformers import AutoProcessor

    ours, theirs = loading.load_processor(EMBEDDED_MODEL), AutoProcessor.from_pretrained(str(EMBEDDED_MODEL))
    picture = images.read(EXAMPLES / "shapes_00.png")
    assert torch.equal(ours.pixel_values(picture), theirs(images=picture, return_tensors="pt").pixel_values)
    text = "two small red circles"
    assert ours.tokenizer(text).input_ids == theirs.tokenizer(text).input_ids


# What importing transformers' processors pulled in before: modeling_utils and, through it,
# torch.distributed.tensor, torch._dynamo (also GitModel's random Embedding init on meta), sympy, scipy.
HEAVY = ("transformers.processing_utils", "transformers.image_processing_utils", "transformers.modeling_utils",
         "torch.distributed.tensor", "torch._dynamo", "sympy", "scipy")


def _heavy_modules_after(script: str) -> str:
    check = f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script) + check], capture_output=True, text=True,
                         check=True, timeout=300)
    return out.stdout.strip().splitlines()[-1]


def test_captioning_with_the_embedded_model_imports_no_modeling_stack():
    loaded = _heavy_modules_after(f"""
        from gitfast import Captioner
        result = Captioner().caption({str(EXAMPLES / "shapes_00.png")!r})[0]
        assert result.ok and result.text, result
    """)
    assert loaded == "[]"


def test_a_preparation_worker_imports_no_modeling_stack():
    loaded = _heavy_modules_after(f"""
        from gitfast.captioning import workers
        workers._init_worker(workers.PrepareSpec({str(EMBEDDED_MODEL)!r}, 2, 128))
        item = workers._prepare_in_worker(None, [(0, {str(EXAMPLES / "shapes_00.png")!r}, None, 20)])[0]
        assert item.error is None and item.pixel_values.shape == (1, 3, 80, 80), item
    """)
    assert loaded == "[]"
