"""Train gitfast's embedded default model: a tiny GIT captioner for the synthetic shapes pictures.

    python -m gitfast.training.train_embedded --out gitfast/assets/git-shapes

Writes a checkpoint folder in the hub GIT format (config.json, model.safetensors, BERT WordPiece
tokenizer files, CLIP preprocessor_config.json, generation_config.json) that loads unchanged with
``transformers.GitForCausalLM.from_pretrained`` and ``AutoProcessor.from_pretrained``. Training uses
transformers' own ``GitForCausalLM`` (the reference gitfast must match) on the CPU, and the pixel
values come from the very processor saved in the folder, so inference sees what training saw.
Everything is seeded; on 2 CPU cores it takes about ten minutes (QUALITY.md has the measured time).

Only the initialisation departs from GIT's: larger query/key (and vision position) weights, without
which a model this small does not learn where things are within the CPU budget (see main()).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch

from . import shapes

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD]=0 as in BERT-uncased's order
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def model_config(vocab_size: int, args) -> "transformers.GitConfig":
    from transformers import GitConfig

    hidden, heads = args.hidden, args.hidden // 64  # head_dim 64 as in every hub GIT checkpoint
    vision = dict(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=heads, image_size=args.image_size, patch_size=args.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    return GitConfig(
        vision_config=vision, vocab_size=vocab_size, hidden_size=hidden,
        num_hidden_layers=args.text_layers, num_attention_heads=heads, intermediate_size=4 * hidden,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        # Captions are <= 12 tokens; 128 positions leave room for longer max_new_tokens requests.
        max_position_embeddings=128, layer_norm_eps=1e-12, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=SPECIALS.index("[CLS]"), eos_token_id=SPECIALS.index("[SEP]"),
    )


def write_tokenizer_and_processor(out: str, image_size: int) -> None:
    """Tokenizer (vocab.txt + tokenizer.json + configs) and CLIP preprocessor config, as on the hub."""
    from transformers import BertTokenizer, CLIPImageProcessor

    words = SPECIALS + shapes.vocabulary()
    with open(os.path.join(out, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True,
                        model_max_length=128)
    tok.save_pretrained(out)
    # Keep the tokenizer config to the keys the hub checkpoints carry (plus the processor class).
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k in ("is_local", "local_files_only", "backend"):
        cfg.pop(k, None)
    cfg["processor_class"] = "GitProcessor"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                   "sep_token": "[SEP]", "unk_token": "[UNK]"}, f, indent=2)
    proc = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, resample=3,  # bicubic, as CLIP
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    proc.save_pretrained(out)
    path = os.path.join(out, "preprocessor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["processor_class"] = "GitProcessor"
    cfg["image_processor_type"] = "CLIPImageProcessor"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def encode(processor, pairs, batch: int = 256):
    """pixel_values from the folder's processor; input_ids padded with [PAD], labels -100 on padding."""
    images = [im for im, _ in pairs]
    pix = torch.cat([processor(images=images[i:i + batch], return_tensors="pt").pixel_values
                     for i in range(0, len(images), batch)])
    enc = processor.tokenizer([c for _, c in pairs], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return pix, enc.input_ids, enc.attention_mask, labels


EXAMPLES_SEED = 2024  # neither the training seed nor evaluate.py's


def write_examples(folder: str, n: int = 8, seed: int = EXAMPLES_SEED) -> list[tuple[str, str]]:
    """The pictures `gitfast caption gitfast/assets/examples` captions in the README: (file, caption)."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, (img, cap) in enumerate(shapes.make_dataset(n, seed)):
        name = f"shapes_{i:02d}.png"
        img.save(os.path.join(folder, name), optimize=True)
        out.append((name, cap))
    return out


@torch.no_grad()
def greedy_captions(model, processor, images, max_new_tokens: int = 20, batch: int = 64) -> list[str]:
    out = []
    for i in range(0, len(images), batch):
        pix = processor(images=images[i:i + batch], return_tensors="pt").pixel_values
        ids = model.generate(pixel_values=pix, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out += processor.batch_decode(ids, skip_special_tokens=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gitfast/assets/git-shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=30000, help="pictures drawn once, reused each epoch")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=80)
    p.add_argument("--patch-size", type=int, default=16)
    # One thread: on a 2-core machine shared with other jobs, 2 OpenMP threads measured 3-5x slower
    # per step than 1 (a descheduled thread stalls every parallel region).
    p.add_argument("--pos-init-std", type=float, default=0.5, help="vision position embedding init std (0: GIT's default)")
    p.add_argument("--qk-init-std", type=float, default=0.1, help="query/key weight init std (0: GIT's default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--examples", help="where to draw the example pictures (default: examples/ beside --out)")
    p.add_argument("--val-size", type=int, default=256, help="held-out pictures checked at the end")
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoProcessor, GitForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    transformers.set_seed(args.seed)
    t0 = time.time()

    os.makedirs(args.out, exist_ok=True)
    write_tokenizer_and_processor(args.out, args.image_size)
    processor = AutoProcessor.from_pretrained(args.out)
    config = model_config(len(processor.tokenizer), args)
    config.save_pretrained(args.out)

    # Training pictures from seed `seed`; evaluate.py and the tests draw from other seeds.
    pix, ids, mask, labels = encode(processor, shapes.make_dataset(args.train_size, args.seed))
    print(f"data: {len(pix)} pictures {tuple(pix.shape[1:])}, {ids.shape[1]} text tokens, "
          f"{time.time() - t0:.0f}s", flush=True)

    model = GitForCausalLM(config)
    if args.pos_init_std:
        # GIT's init (std 0.02) makes position a faint signal next to a patch's content. On its own
        # this change did not make position learnable (attention stayed uniform, see below); it is
        # kept because the shipped model was trained with it.
        with torch.no_grad():
            model.git.image_encoder.vision_model.embeddings.position_embedding.weight.normal_(
                0.0, args.pos_init_std)
    if args.qk_init_std:
        # With GIT's std 0.02 the attention logits start near zero: after 4000 steps the caption
        # tokens still averaged all image tokens uniformly and "on the left / at the top" stayed at
        # chance. With std 0.1 attention is uneven from step 0 and position was learnt in < 1000 steps.
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                    prm.normal_(0.0, args.qk_init_std)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):  # linear warmup, cosine decay to 5%
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(pix), generator=gen), 0
    monitor = shapes.make_dataset(64, seed=20_000 + args.seed)
    t_train, smooth = time.time(), None
    for step in range(args.steps):
        if pos + args.batch > len(order):
            order, pos = torch.randperm(len(pix), generator=gen), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        loss = model(pixel_values=pix[idx], input_ids=ids[idx], attention_mask=mask[idx],
                     labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {smooth:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t_train:.0f}s", flush=True)
        if step % 1000 == 999:  # progress check on a few held-out pictures
            model.eval()
            preds = greedy_captions(model, processor, [im for im, _ in monitor])
            model.train()
            print(f"  held-out exact match {sum(p == c for p, (_, c) in zip(preds, monitor)) / len(monitor):.3f}"
                  f" on {len(monitor)}", flush=True)

    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    # safetensors writes 0600; a package file must be readable by every user of an installation.
    os.chmod(os.path.join(args.out, "model.safetensors"), 0o644)
    examples = write_examples(args.examples or os.path.join(os.path.dirname(os.path.abspath(args.out)), "examples"))
    train_s = time.time() - t0
    # A quick held-out check; evaluate.py measures the figures reported in QUALITY.md.
    val = shapes.make_dataset(args.val_size, seed=10_000 + args.seed)
    preds = greedy_captions(model, processor, [im for im, _ in val])
    exact = sum(p == c for p, (_, c) in zip(preds, val)) / len(val)
    print(f"done: {train_s:.0f}s total; held-out exact match {exact:.3f} on {len(val)} pictures", flush=True)
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump({"args": vars(args), "seconds": round(train_s, 1), "final_loss": smooth,
                   "parameters": n_params, "quick_val_exact": exact, "torch": torch.__version__,
                   "transformers": transformers.__version__, "examples": examples}, f, indent=2)


if __name__ == "__main__":
    main()
