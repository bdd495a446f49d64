"""Synthetic captioning data: coloured shapes on varied backgrounds, captions from a small grammar.

Every picture shows a *group* of one to three identical shapes (same kind, size and colour) in one
region of the picture, on a solid, gradient or noisy background:

    "three small red circles in the center"
    "one large blue triangle on the left"
    "two small yellow squares at the top"

The caption is a pure function of what is drawn, so a model can only get it right by looking. Shapes
sit in the cells of a 5 x 5 grid (see GRID), the regions do not overlap and the two sizes are well
apart, because the embedded model is tiny and is asked for exact captions. (A first grammar also
placed the group left of / above ... a second, reference shape: in the ~10 minute CPU budget the
tiny model learnt count, size and colour but stayed near chance on shape kind and relation.)

``draw_sample(rng)`` draws one (image, caption) pair from a ``random.Random``; ``make_dataset(n, seed)``
draws n of them reproducibly. Nothing here depends on torch or transformers.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

# The picture is a 5 x 5 grid of 32 px cells and every shape sits (with a little jitter) inside one
# cell. At the model's 80 px input with 16 px patches each cell is exactly one ViT patch, so one patch
# token sees one whole shape: that is what lets a ~1M-parameter GIT learn exact captions from scratch
# on a CPU in minutes (free placement, where shapes straddle patches, trained far slower).
GRID = 5
CELL = 32
CANVAS = GRID * CELL  # drawn size; the model's processor halves it

COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
# Saturated, well separated hues: backgrounds below are muted so a colour name never depends on them.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 205),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")

# Shape side length in canvas pixels (a cell is 32). The gap between the ranges keeps "small" and
# "large" readable after the processor halves the picture.
SIZE_PX = {"small": (18, 21), "large": (26, 30)}

# Muted background tones (low saturation, mid brightness): far from every shape colour above.
BACKGROUNDS = (
    (90, 90, 90), (120, 120, 110), (70, 80, 95), (110, 95, 80), (60, 60, 60),
    (100, 115, 100), (130, 120, 135), (85, 100, 110), (140, 135, 120), (75, 65, 70),
)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (the tokenizer's vocabulary after specials)."""
    words = list(COUNTS) + list(SIZES) + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES]
    for pos in POSITIONS:
        words += pos.split()
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def caption_of(count: int, size: str, color: str, shape: str, position: str) -> str:
    noun = shape if count == 1 else shape + "s"
    return f"{COUNTS[count - 1]} {size} {color} {noun} {position}"


def _background(rng: random.Random) -> Image.Image:
    kind = rng.choice(("solid", "gradient", "noise"))
    c0 = np.array(rng.choice(BACKGROUNDS), dtype=np.float32)
    if kind == "solid":
        arr = np.broadcast_to(c0, (CANVAS, CANVAS, 3)).copy()
    else:
        c1 = np.array(rng.choice(BACKGROUNDS), dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / (CANVAS - 1)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        arr = c0 + (c1 - c0) * t[..., None]
        if kind == "noise":
            arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# Every shape has a dark outline. Without it the kind of shape stayed at chance in training: a
# circle and a square of one colour differ in a few corner pixels whose values depend on the fill and
# background colours, while a dark rim gives the patch projection the same silhouette for every colour.
OUTLINE = (20, 20, 20)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, rgb) -> None:
    h = side / 2
    style = dict(fill=rgb, outline=OUTLINE, width=2)
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), **style)
    elif shape == "square":
        h *= 0.9  # a square of the same side looks bigger than a circle; keep the areas close
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), **style)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], **style)
    else:
        raise ValueError(shape)


def _cells(rng: random.Random, count: int, position: str) -> list[tuple[int, int]]:
    """Grid cells (col, row) of the group: a line along the border it is named after, kept off the
    corners (so "on the left" is never also "at the top"), or across the middle for the center."""
    last = GRID - 1
    if position == "in the center":
        first = {1: 2, 2: rng.choice((1, 2)), 3: 1}[count]
        return [(first + i, GRID // 2) for i in range(count)]
    start = rng.randint(1, last - count)  # within cells 1 .. GRID-2 along the border
    line = [start + i for i in range(count)]
    if position == "on the left":
        return [(0, r) for r in line]
    if position == "on the right":
        return [(last, r) for r in line]
    if position == "at the top":
        return [(c, 0) for c in line]
    return [(c, last) for c in line]


def _centre(rng: random.Random, cell, side: float):
    """Pixel centre of a shape of width `side` in `cell`, jittered by at most 2 px (1 px at 80 px).

    Larger jitter (up to the cell border) made the kind of shape much slower to learn: one patch
    projection then has to recognise each shape at every offset."""
    room = min(2.0, max(0.0, (CELL - side) / 2 - 1.5))
    return ((cell[0] + 0.5) * CELL + rng.uniform(-room, room),
            (cell[1] + 0.5) * CELL + rng.uniform(-room, room))


def draw_sample(rng: random.Random) -> tuple[Image.Image, str]:
    """Draw one picture and its caption; all randomness comes from `rng` (a ``random.Random``)."""
    count = rng.randint(1, 3)
    size = rng.choice(SIZES)
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    position = rng.choice(POSITIONS)
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    side = rng.uniform(*SIZE_PX[size])  # one size for the whole group
    for cell in _cells(rng, count, position):
        _draw_shape(draw, shape, *_centre(rng, cell, side), side, COLORS[color])
    return img, caption_of(count, size, color, shape, position)


def make_dataset(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """n (image, caption) pairs drawn from ``random.Random(seed)``: the same seed gives the same pairs."""
    rng = random.Random(seed)
    return [draw_sample(rng) for _ in range(n)]
