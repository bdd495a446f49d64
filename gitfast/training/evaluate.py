"""Held-out quality of the embedded model, measured with transformers' GitForCausalLM (greedy).

    python -m gitfast.training.evaluate                      # 1000 pictures, seed 12345
    python -m gitfast.training.evaluate --n 200 --json out.json

Pictures come from a seed the training never used. Reported:
  * exact match: the decoded greedy caption equals the drawn picture's caption;
  * token accuracy: over the reference token ids (words + [SEP], after [CLS]), the share of positions
    where the generated id is the same id (a missing or extra token counts as wrong);
  * per-slot accuracy (count, size, colour, shape, position), to see what the model misses.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from . import shapes

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "git-shapes")
HELD_OUT_SEED = 12345


def _slots(caption: str) -> dict:
    w = caption.split()
    return {"count": w[:1], "size": w[1:2], "colour": w[2:3], "shape": w[3:4], "position": w[4:]}


def evaluate(model_dir: str = DEFAULT_MODEL, n: int = 1000, seed: int = HELD_OUT_SEED,
             max_new_tokens: int = 20, batch: int = 50) -> dict:
    from transformers import AutoProcessor, GitForCausalLM

    processor = AutoProcessor.from_pretrained(model_dir)
    model = GitForCausalLM.from_pretrained(model_dir).eval()
    tok = processor.tokenizer
    data = shapes.make_dataset(n, seed)
    t0 = time.time()
    gen_ids = []
    with torch.no_grad():
        for i in range(0, n, batch):
            pix = processor(images=[im for im, _ in data[i:i + batch]], return_tensors="pt").pixel_values
            out = model.generate(pixel_values=pix, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            gen_ids += [row[1:].tolist() for row in out]  # drop the [CLS] prompt
    seconds = time.time() - t0

    exact = tok_right = tok_total = 0
    slot_right: dict[str, int] = {}
    errors = []
    for ids, (_, ref) in zip(gen_ids, data):
        ref_ids = tok(ref, add_special_tokens=False).input_ids + [tok.sep_token_id]
        tok_total += len(ref_ids)
        tok_right += sum(a == b for a, b in zip(ids, ref_ids))
        pred = tok.decode(ids, skip_special_tokens=True)
        if pred == ref:
            exact += 1
        elif len(errors) < 20:
            errors.append({"reference": ref, "generated": pred})
        try:
            ps = _slots(pred)
        except Exception:  # a malformed caption gets every slot wrong
            ps = {}
        for k, v in _slots(ref).items():
            slot_right[k] = slot_right.get(k, 0) + (ps.get(k) == v)

    import transformers

    return {
        "model": os.path.relpath(model_dir),
        "pictures": n, "seed": seed, "max_new_tokens": max_new_tokens, "decoding": "greedy",
        "exact_match": exact / n,
        "token_accuracy": tok_right / tok_total,
        "slot_accuracy": {k: v / n for k, v in slot_right.items()},
        "generate_seconds": round(seconds, 1),
        "examples_of_errors": errors,
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="held-out quality of the embedded GIT model")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, args.n, args.seed, args.max_new_tokens)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
