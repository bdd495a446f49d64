"""gitfast.captioning.images: every image mode becomes the right RGB picture; bad data is an ImageError."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from gitfast.captioning import images
from image_factory import broken_files, encode, mode_images

GOOD = mode_images()


def opened(name):
    im = Image.open(io.BytesIO(GOOD[name]))
    im.load()
    return im


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_mode_decodes_to_rgb(name):
    im = images.decode(GOOD[name])
    assert im.mode == "RGB"
    assert im.size == ((48, 40) if name == "exif_rotated.jpg" else (40, 48))


def test_grey_and_bilevel_keep_their_values():
    grey = np.asarray(images.decode(GOOD["grey_L.png"]))
    assert (grey == np.asarray(opened("grey_L.png"))[..., None]).all()
    bilevel = np.asarray(images.decode(GOOD["bilevel.png"]))
    assert set(np.unique(bilevel)) == {0, 255}


@pytest.mark.parametrize("name", ["alpha_RGBA.png", "alpha_LA.png", "palette_transparent.png"])
def test_transparency_is_composited_onto_white_like_transformers(name):
    from transformers.image_transforms import convert_to_rgb

    ours = np.asarray(images.decode(GOOD[name]))
    theirs = np.asarray(convert_to_rgb(opened(name), return_numpy=True))
    assert (ours == theirs).all()
    rgba = np.asarray(opened(name).convert("RGBA")).astype(float)
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(ours - expected).max() <= 1
    assert (ours[rgba[..., 3] == 0] == 255).all()  # fully transparent → white, not black


def test_sixteen_bit_grey_is_scaled_not_clipped():
    raw = np.asarray(opened("grey16.png")).astype(float)
    assert raw.max() > 255  # the case Pillow's convert("RGB") would turn white
    ours = np.asarray(images.decode(GOOD["grey16.png"]))
    assert (ours[..., 0] == np.rint(raw / 257)).all()
    assert ours.max() < 255


def test_cmyk_and_palette_use_pillows_conversion():
    for name in ("cmyk.jpg", "palette_P.gif"):
        assert (np.asarray(images.decode(GOOD[name])) == np.asarray(opened(name).convert("RGB"))).all()


def test_exif_orientation_is_applied():
    upright = np.asarray(ImageOps.exif_transpose(opened("exif_rotated.jpg")))
    stored = np.asarray(opened("exif_rotated.jpg"))
    ours = np.asarray(images.decode(GOOD["exif_rotated.jpg"]))
    assert ours.shape == (40, 48, 3) and stored.shape == (48, 40, 3)
    assert (ours == upright).all()
    assert (ours == np.rot90(stored, k=-1)).all()  # orientation 6: turn 90° clockwise


def test_in_memory_images_follow_the_same_rules():
    assert (np.asarray(images.to_rgb(opened("alpha_LA.png"))) == np.asarray(images.decode(GOOD["alpha_LA.png"]))).all()


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "cannot decode"), ("empty.png", "empty file"),
                                         ("text_renamed.jpg", "not an image")])
def test_broken_data_is_an_image_error(name, reason):
    with pytest.raises(images.ImageError, match=reason):
        images.decode(broken_files()[name])


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    data = GOOD["rgb.png"]  # 40 x 48 = 1920 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # between 1x and 2x: Pillow alone would only warn
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.decode(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.decode(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1920)
    assert images.decode(data).size == (40, 48)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(images.ImageError, match="cannot read file"):
        images.read(tmp_path / "nope.png")


def test_jpeg_draft_decodes_smaller_but_never_below_the_size_asked():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    data = encode(photo, "JPEG", quality=90)
    assert images.decode(data).size == (640, 480)
    assert images.decode(data, (224, 224)).size == (320, 240)      # 1/2: both sides still >= 224
    assert images.decode(data, (32, 32)).size == (80, 60)          # 1/8 is the largest reduction
    assert images.decode(data, (300, 300)).size == (640, 480)      # 1/2 would give 240 < 300
    assert images.decode(data, (224, 224)).mode == "RGB"
    assert images.decode(encode(photo, "PNG"), (32, 32)).size == (640, 480)  # only JPEGs have drafts
    grey = images.decode(encode(photo.convert("L"), "JPEG"), (224, 224))
    assert grey.mode == "RGB" and grey.size == (320, 240)
