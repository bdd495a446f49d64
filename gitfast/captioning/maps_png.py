"""Word maps as pictures: `gitfast caption --maps DIR` writes one PNG per image, the picture first, then
one panel per generated word with its map (`CaptionResult.maps`, `gitfast.explain.maps`) over it.

The map covers the square the processor keeps (GIT's CLIP processor resizes the shortest edge and
crops the centre), so the picture is centre-cropped to a square for display. Matplotlib's Agg
backend draws off-screen; nothing is shown.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Set

import numpy as np
from PIL import Image

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(source: str, taken: Optional[Set[str]] = None, limit: int = 120) -> str:
    """A file name for `source`'s PNG: unsafe characters (separators, spaces, `::`, control and
    non-ASCII characters) become `_`, long names keep their end, and a name already in `taken` gets
    `-2`, `-3`, ... (`taken` is updated)."""
    stem = _UNSAFE.sub("_", source).strip("._") or "image"
    stem = stem[-limit:]
    name, n = f"{stem}.png", 1
    while taken is not None and name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    if taken is not None:
        taken.add(name)
    return name


def _square(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def render(image: Image.Image, words: Sequence[str], maps, path: str, caption: Optional[str] = None,
           columns: int = 4) -> str:
    """Writes the picture and each word's map over it to `path` (PNG). `maps` [len(words), gh, gw]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != len(words):
        raise ValueError(f"expected one [grid_h, grid_w] map per word; got {maps.shape} for {len(words)} words")
    picture = np.asarray(_square(image.convert("RGB")))
    panels = 1 + len(words)
    cols = min(columns, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    extent = (0, picture.shape[1], picture.shape[0], 0)
    smooth = "bilinear" if max(maps.shape[1:]) > 8 else "nearest"
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= panels:
            continue
        ax.imshow(picture, extent=extent)
        if i == 0:
            ax.set_title(_wrap(caption) if caption else "image", fontsize=9)
            continue
        m = maps[i - 1]
        ax.imshow(m / max(float(m.max()), 1e-12), cmap="inferno", alpha=0.6, vmin=0, vmax=1,
                  extent=extent, interpolation=smooth)
        ax.set_title(words[i - 1], fontsize=12, fontweight="bold")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 30) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def written(folder: str, pairs, tokenizer):
    """`(Source, CaptionResult)` pairs -> the results, after writing each one's PNG into `folder`
    (a result without maps writes nothing)."""
    from .workers import load_rgb

    taken: Set[str] = set()
    for source, result in pairs:
        if result.maps is not None:
            words = [tokenizer.decode([t]) for t in result.token_ids]
            render(load_rgb(source), words, result.maps, os.path.join(folder, safe_name(source.id, taken)),
                   caption=result.text)
        yield result
