"""Where gitfast's embedded default model and example images live (shipped inside the package)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
# A small GIT checkpoint trained on synthetic shapes: what `Captioner()` and `gitfast caption` use
# when no --model is given, so the package works offline out of the box.
EMBEDDED_MODEL = ASSETS / "git-shapes"
# Pictures of the kind EMBEDDED_MODEL was trained on, for the README's first captioning command.
EXAMPLES = ASSETS / "examples"
