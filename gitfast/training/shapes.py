"""Synthetic captioning data: coloured shapes on varied backgrounds, captions from a small grammar.

Every image shows a *group* of one to three identical shapes (same kind, size and colour). Either the
group sits alone in the middle of the picture, or it sits on one side of a single *reference* shape:

    "three small red circles in the center"
    "one large blue triangle left of a green square"
    "two small yellow squares above a purple circle"

The caption is a pure function of what is drawn, so a model can only get it right by looking. The
layout keeps the relation unambiguous (the whole group lies on the named side of the reference) and
the two sizes well apart, because the embedded model is tiny and is asked for exact captions.

``draw_sample(rng)`` draws one (image, caption) pair from a ``random.Random``; ``make_dataset(n, seed)``
draws n of them reproducibly. Nothing here depends on torch or transformers.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 128  # drawn size; the model's processor resizes to its own image size

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
RELATIONS = ("left of", "right of", "above", "below", "in the center")

# Shape side length in canvas pixels. The gap between the ranges keeps "small" and "large" readable
# after the processor halves the picture; the reference shape is always medium (not named).
SIZE_PX = {"small": (18, 22), "large": (30, 36)}
REF_PX = (22, 28)

# Muted background tones (low saturation, mid brightness): far from every shape colour above.
BACKGROUNDS = (
    (90, 90, 90), (120, 120, 110), (70, 80, 95), (110, 95, 80), (60, 60, 60),
    (100, 115, 100), (130, 120, 135), (85, 100, 110), (140, 135, 120), (75, 65, 70),
)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (the tokenizer's vocabulary after specials)."""
    words = list(COUNTS) + list(SIZES) + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES]
    for rel in RELATIONS:
        words += rel.split()
    words.append("a")
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def caption_of(count: int, size: str, color: str, shape: str, relation: str,
               ref_color: str | None = None, ref_shape: str | None = None) -> str:
    noun = shape if count == 1 else shape + "s"
    head = f"{COUNTS[count - 1]} {size} {color} {noun}"
    if relation == "in the center":
        return f"{head} in the center"
    return f"{head} {relation} a {ref_color} {ref_shape}"


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


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, rgb) -> None:
    h = side / 2
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=rgb)
    elif shape == "square":
        h *= 0.9  # a square of the same side looks bigger than a circle; keep the areas close
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=rgb)
    else:
        raise ValueError(shape)


def _line(rng: random.Random, n: int, side: float, lo: float, hi: float) -> list[float]:
    """Centres of n shapes of width `side` spread along [lo, hi] with at least a small gap, jittered."""
    gap = 5.0  # keeps neighbours apart after the processor halves the picture
    span = n * side + (n - 1) * gap
    start = rng.uniform(lo, max(lo, hi - span))
    return [start + side / 2 + i * (side + gap) for i in range(n)]


def draw_sample(rng: random.Random) -> tuple[Image.Image, str]:
    """Draw one picture and its caption; all randomness comes from `rng` (a ``random.Random``)."""
    count = rng.randint(1, 3)
    size = rng.choice(SIZES)
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    relation = rng.choice(RELATIONS)
    ref_color = ref_shape = None
    if relation != "in the center":
        # The reference differs in colour so the group and the reference are never confused.
        ref_color = rng.choice([c for c in COLORS if c != color])
        ref_shape = rng.choice(SHAPES)

    img = _background(rng)
    draw = ImageDraw.Draw(img)
    side = rng.uniform(*SIZE_PX[size])
    rgb = COLORS[color]
    m = 4.0  # margin from the border
    c = CANVAS / 2

    if relation == "in the center":
        xs = _line(rng, count, side, c - (count * (side + 5)) / 2 - 4, c + (count * (side + 5)) / 2 + 4)
        y = c + rng.uniform(-5, 5)
        centres = [(x, y) for x in xs]
    else:
        ref_side = rng.uniform(*REF_PX)
        horizontal = relation in ("left of", "right of")
        # Split the canvas into the group's half and the reference's half along the relation's axis.
        split = c + rng.uniform(-6, 6)
        group_first = relation in ("left of", "above")
        g_lo, g_hi = (m, split - 2) if group_first else (split + 2, CANVAS - m)
        r_lo, r_hi = (split + 2, CANVAS - m) if group_first else (m, split - 2)
        # Along the axis: centre of the group's band and of the reference, each inside its half.
        g_axis = rng.uniform(g_lo + side / 2, g_hi - side / 2)
        r_axis = rng.uniform(r_lo + ref_side / 2, r_hi - ref_side / 2)
        # Across the axis: the group is a line of shapes, the reference anywhere overlapping its span.
        across = _line(rng, count, side, m, CANVAS - m)
        mid = (across[0] + across[-1]) / 2
        r_across = min(max(mid + rng.uniform(-12, 12), m + ref_side / 2), CANVAS - m - ref_side / 2)
        if horizontal:
            centres = [(g_axis, a) for a in across]
            ref_xy = (r_axis, r_across)
        else:
            centres = [(a, g_axis) for a in across]
            ref_xy = (r_across, r_axis)
        _draw_shape(draw, ref_shape, ref_xy[0], ref_xy[1], ref_side, COLORS[ref_color])

    for x, y in centres:
        _draw_shape(draw, shape, x, y, side, rgb)
    return img, caption_of(count, size, color, shape, relation, ref_color, ref_shape)


def make_dataset(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """n (image, caption) pairs drawn from ``random.Random(seed)``: the same seed gives the same pairs."""
    rng = random.Random(seed)
    return [draw_sample(rng) for _ in range(n)]
