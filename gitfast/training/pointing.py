"""Pointing game for word maps (`gitfast.explain.maps`): does each word's map peak where the shapes are?

    python -m gitfast.training.pointing                  # 200 held-out pictures, every method
    python -m gitfast.training.pointing --n 50 --methods rollout:predicting

Pictures are drawn exactly as `shapes.draw_sample` draws them (same random stream, checked by
tests/test_maps.py), from a seed training never used, keeping the grid cells of the drawn shapes.
The embedded model captions each picture greedily; for every generated word the map's highest
cell must be one of the shapes' cells (at the model's 80 px input one cell is one patch). Chance is
the share of the 25 cells that hold a shape: 1, 2 or 3 in 25 (`chance` below, averaged the same way).
Words are scored by slot: count, size, colour, shape, and the position phrase's words.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

from PIL import ImageDraw

from . import shapes

HELD_OUT_SEED = 424242
SLOTS = ("count", "size", "colour", "shape", "position")


def draw_with_cells(rng: random.Random):
    """`shapes.draw_sample`, also returning the (col, row) grid cells of the drawn shapes."""
    count = rng.randint(1, 3)
    size = rng.choice(shapes.SIZES)
    color = rng.choice(list(shapes.COLORS))
    shape = rng.choice(shapes.SHAPES)
    position = rng.choice(shapes.POSITIONS)
    img = shapes._background(rng)
    draw = ImageDraw.Draw(img)
    side = rng.uniform(*shapes.SIZE_PX[size])
    cells = shapes._cells(rng, count, position)
    for cell in cells:
        shapes._draw_shape(draw, shape, *shapes._centre(rng, cell, side), side, shapes.COLORS[color])
    return img, shapes.caption_of(count, size, color, shape, position), cells


def held_out(n: int, seed: int = HELD_OUT_SEED):
    rng = random.Random(seed)
    return [draw_with_cells(rng) for _ in range(n)]


def slot_of(word: str) -> str:
    if word in shapes.COUNTS:
        return "count"
    if word in shapes.SIZES:
        return "size"
    if word in shapes.COLORS:
        return "colour"
    if word.rstrip("s") in shapes.SHAPES:
        return "shape"
    return "position"


def score(maps, words: Sequence[str], cells) -> List[Tuple[str, bool]]:
    """(slot, hit) per word: the map's highest cell is a shape's cell."""
    out = []
    grid_w = maps.shape[-1]
    truth = {row * grid_w + col for col, row in cells}
    for m, w in zip(maps, words):
        out.append((slot_of(w), int(m.flatten().argmax()) in truth))
    return out


def play(captioner, pictures, variants: Sequence[Tuple[str, str]], batch: int = 25) -> Dict:
    """Per variant `method:position`, per slot: hits / words; plus chance per slot and caption timing."""
    from ..explain import maps

    hits = {f"{m}:{p}": defaultdict(lambda: [0, 0]) for m, p in variants}
    chance = defaultdict(lambda: [0.0, 0])
    seconds = defaultdict(float)
    for start in range(0, len(pictures), batch):
        chunk = pictures[start:start + batch]
        t0 = time.perf_counter()
        results = captioner.caption([img for img, _, _ in chunk])
        seconds["caption"] += time.perf_counter() - t0
        prepared = [captioner.preparer(i, img, None, 20) for i, (img, _, _) in enumerate(chunk)]
        import torch

        pixels = torch.cat([p.pixel_values for p in prepared])
        prompts = [p.prompt_ids for p in prepared]
        tokens = [list(r.token_ids) for r in results]
        words = [[captioner.tokenizer.decode([t]) for t in ids] for ids in tokens]
        for (_, _, cells), ws in zip(chunk, words):
            for w in ws:
                c = chance[slot_of(w)]
                c[0] += len(cells) / 25
                c[1] += 1
        for method, position in variants:
            t0 = time.perf_counter()
            per_image = maps.word_maps(captioner.model, pixels, prompts, tokens, method, position)
            seconds[f"{method}:{position}"] += time.perf_counter() - t0
            for m, ws, (_, _, cells) in zip(per_image, words, chunk):
                for slot, hit in score(m, ws, cells):
                    h = hits[f"{method}:{position}"][slot]
                    h[0] += hit
                    h[1] += 1
    return {"accuracy": {v: {s: h[s][0] / h[s][1] for s in SLOTS if h[s][1]} for v, h in hits.items()},
            "words": {s: chance[s][1] for s in SLOTS},
            "chance": {s: chance[s][0] / chance[s][1] for s in SLOTS if chance[s][1]},
            "seconds": dict(seconds), "pictures": len(pictures)}


def all_variants() -> List[Tuple[str, str]]:
    from ..explain.maps import GRADIENT, METHODS, POSITIONS

    return [(m, p) for m in METHODS for p in POSITIONS if m not in GRADIENT or p == "predicting"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--methods", default=None, help="comma-separated method:position (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from ..captioning.captioner import Captioner

    variants = ([tuple(v.split(":")) for v in args.methods.split(",")] if args.methods else all_variants())
    report = play(Captioner(device="cpu"), held_out(args.n, args.seed), variants)
    print(f"{'method':22s} " + " ".join(f"{s:>9s}" for s in SLOTS))
    print(f"{'chance':22s} " + " ".join(f"{report['chance'].get(s, 0):9.1%}" for s in SLOTS))
    for v, acc in report["accuracy"].items():
        print(f"{v:22s} " + " ".join(f"{acc.get(s, 0):9.1%}" for s in SLOTS))
    print("words per slot:", report["words"], " seconds:", {k: round(x, 2) for k, x in report["seconds"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
