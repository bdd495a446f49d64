"""Test data for captioning: a tiny GIT checkpoint folder with its processor, and image files in every
mode Captioner must handle, plus broken ones."""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

SIZE = 32  # image size of the tiny checkpoint (patch 8 → 16 image tokens)
WORDS = ("a red blue green yellow big small circle square triangle on of the is what color shape "
         "how many left right top bottom and with there are two three one ? , .").split()


def make_checkpoint(folder: str, seed: int = 0) -> str:
    """A random transformers GIT model + BERT WordPiece tokenizer + CLIP image processor, saved as a
    hub-style folder that `AutoProcessor` and both GitForCausalLM classes load."""
    import transformers
    from transformers import BertTokenizerFast, CLIPImageProcessor, GitConfig, GitProcessor

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ed"]
    # transformers 5's BERT tokenizer takes the WordPiece vocabulary itself (it writes vocab.txt on save)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)},
                                  model_input_names=["input_ids", "attention_mask"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)

    config = GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=len(vocab), max_position_embeddings=48, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GitForCausalLM(config).eval()
    with torch.no_grad():  # decisive greedy choices that depend on the picture and the prompt
        model.output.weight.mul_(20.0)
        # EOS wins wherever "yellow" would: some captions end early, others run to max_new_tokens
        model.output.weight[config.eos_token_id] = 1.05 * model.output.weight[vocab.index("yellow")]
        model.git.visual_projection.visual_projection[1].weight.mul_(4.0)
        for layer in model.git.encoder.layer:
            layer.attention.self.query.weight.mul_(6.0)
            layer.attention.self.key.weight.mul_(6.0)
    model.save_pretrained(folder)
    return folder


def rgb_array(seed: int, size=(48, 40)) -> np.ndarray:
    """A smooth random picture (h, w, 3) so that resizing keeps it distinct from other seeds."""
    g = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = g.uniform(-3, 3, (3, 3))
    img = np.stack([np.sin(a[i] * x + b[i] * y + c[i]) for i in range(3)], -1)
    return ((img + 1) * 127.5).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def mode_images() -> dict:
    """name -> encoded bytes of good images in every mode Captioner converts, each distinct."""
    rgb = [Image.fromarray(rgb_array(s)) for s in range(10)]
    rgba = rgb[2].convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (48, 1))))
    la = rgb[3].convert("LA")
    la.putalpha(128)
    p_trans = rgb[5].convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_trans.info["transparency"] = 0
    grey16 = Image.fromarray((rgb_array(6)[..., 0].astype(np.uint16) * 257 // 3 + 20000).astype(np.uint16))
    rotated = rgb[8].copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    return {
        "rgb.png": encode(rgb[0], "PNG"),
        "grey_L.png": encode(rgb[1].convert("L"), "PNG"),
        "alpha_RGBA.png": encode(rgba, "PNG"),
        "alpha_LA.png": encode(la, "PNG"),
        "palette_P.gif": encode(rgb[4].convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "GIF"),
        "palette_transparent.png": encode(p_trans, "PNG", transparency=0),
        "grey16.png": encode(grey16, "PNG"),
        "cmyk.jpg": encode(rgb[7].convert("CMYK"), "JPEG", quality=95),
        "bilevel.png": encode(rgb[9].convert("1"), "PNG"),
        "exif_rotated.jpg": encode(rotated, "JPEG", quality=95, exif=exif),
    }


def broken_files() -> dict:
    """name -> bytes that must each become an error record."""
    good_jpeg = encode(Image.fromarray(rgb_array(11)), "JPEG", quality=95)
    return {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "empty.png": b"",
        "text_renamed.jpg": b"this is a text file, not a picture\n",
    }


def write_files(folder: str, files: dict) -> list:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def small_images(n: int, seed: int = 100) -> dict:
    """name -> bytes of `n` distinct small images (PNG and JPEG alternating), for runs over many inputs."""
    out = {}
    for i in range(n):
        image = Image.fromarray(rgb_array(seed + i, size=(24, 20)))
        out[f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"] = (
            encode(image, "PNG") if i % 2 else encode(image, "JPEG", quality=90))
    return out


def write_tar(path: str, members) -> str:
    """A tar file holding `members` ((name, bytes) pairs or a dict, in order) under exactly those names."""
    import tarfile

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    items = members.items() if isinstance(members, dict) else members
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def webdataset_samples(images: dict, start: int = 0, meta: bool = True) -> list:
    """(member name, bytes) pairs of an img2dataset-style shard: KEY.<ext> image, KEY.json, KEY.txt."""
    import json

    members = []
    for n, (name, data) in enumerate(images.items(), start):
        key = f"{n:09d}"
        members.append((f"{key}.{name.rsplit('.', 1)[1]}", data))
        if meta:
            members.append((f"{key}.json", json.dumps({"key": key, "caption": f"alt text {n}", "url": f"http://x/{n}",
                                                       "width": 24, "status": "success"}).encode()))
            members.append((f"{key}.txt", f"alt text {n}".encode()))
    return members
