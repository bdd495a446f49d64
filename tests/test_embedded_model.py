"""The embedded default model (gitfast/assets/git-shapes) and its synthetic data generator.

Checks that the shipped folder is a hub-format GIT checkpoint transformers loads unchanged, that the
generator is reproducible, and that the model still captions held-out pictures about as well as
QUALITY.md says (with a margin: this is a regression guard, not the measurement).
"""
import json
import os
import random

import pytest
import torch

from gitfast.training import shapes

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gitfast", "assets")
MODEL = os.path.join(ASSETS, "git-shapes")
EXAMPLES = os.path.join(ASSETS, "examples")
# Measured (QUALITY.md): 99.9% exact captions, 99.99% token accuracy on 1000 held-out pictures. The
# bounds leave room for another platform's float rounding or torchvision's resize in the processor.
MIN_TOKEN_ACCURACY = 0.95
MIN_EXACT_OF_16 = 14


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, GitForCausalLM

    torch.manual_seed(0)
    model, info = GitForCausalLM.from_pretrained(MODEL, output_loading_info=True)
    return model.eval(), info, AutoProcessor.from_pretrained(MODEL)


def test_folder_has_hub_files():
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "preprocessor_config.json", "QUALITY.md"):
        assert os.path.isfile(os.path.join(MODEL, name)), name
    assert os.path.getsize(os.path.join(MODEL, "model.safetensors")) < 5 * 2**20


def test_config_matches_hub_layout():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(MODEL)
    assert cfg.model_type == "git"
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    v = cfg.vision_config
    assert v.hidden_size // v.num_attention_heads == 64
    assert v.hidden_act == "quick_gelu" and cfg.hidden_act == "gelu"
    assert cfg.num_image_with_embedding is None
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 2, 3)


def test_loads_in_transformers_without_missing_keys(loaded):
    model, info, processor = loaded
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info.get(key))
    assert type(processor).__name__ == "GitProcessor"
    assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor")
    size = model.config.vision_config.image_size
    pix = processor(images=shapes.make_dataset(1, 3)[0][0], return_tensors="pt").pixel_values
    assert tuple(pix.shape) == (1, 3, size, size)


def test_tokenizer_round_trip(loaded):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    assert type(loaded[2].tokenizer).__name__.startswith("BertTokenizer")
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    cap = "Two small RED circles on the left"
    ids = tok(cap).input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids  # every grammar word is one vocabulary entry
    assert len(ids) == len(cap.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == cap.lower()
    assert len(tok) == 5 + len(shapes.vocabulary())


def test_generator_is_deterministic():
    a, b = shapes.make_dataset(4, 99), shapes.make_dataset(4, 99)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(x.tobytes() == y.tobytes() for (x, _), (y, _) in zip(a, b))
    img, cap = shapes.draw_sample(random.Random(99))
    assert cap == a[0][1] and img.tobytes() == a[0][0].tobytes()
    c = shapes.make_dataset(4, 100)
    assert [x.tobytes() for x, _ in a] != [x.tobytes() for x, _ in c]
    assert img.mode == "RGB" and img.size == (shapes.CANVAS, shapes.CANVAS)
    words = set(shapes.vocabulary())
    for _, cap in shapes.make_dataset(50, 1):
        assert set(cap.split()) <= words


def test_greedy_captions_on_held_out_pictures(loaded):
    """Fresh pictures from a seed neither training nor evaluate.py used."""
    model, _, processor = loaded
    tok = processor.tokenizer
    data = shapes.make_dataset(16, 424242)
    pix = processor(images=[im for im, _ in data], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.generate(pixel_values=pix, max_new_tokens=20, do_sample=False, num_beams=1)
    right = total = exact = 0
    for row, (_, ref) in zip(out, data):
        ref_ids = tok(ref, add_special_tokens=False).input_ids + [tok.sep_token_id]
        gen = row[1:].tolist()
        right += sum(a == b for a, b in zip(gen, ref_ids))
        total += len(ref_ids)
        exact += tok.decode(gen, skip_special_tokens=True) == ref
    assert right / total >= MIN_TOKEN_ACCURACY, (right / total, exact)
    assert exact >= MIN_EXACT_OF_16, (right / total, exact)


def test_examples_folder():
    from PIL import Image

    files = sorted(f for f in os.listdir(EXAMPLES) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    assert len(files) >= 8
    for f in files:
        with Image.open(os.path.join(EXAMPLES, f)) as im:
            assert im.convert("RGB").size[0] >= 64
