#!/usr/bin/env bash
# CI, after the tests: what a user who installs the package (not editable) gets. Builds the wheel with
# the extension, installs it into a fresh virtual environment, and from a folder outside the checkout
# captions the examples, checks that `gitfast info` finds the extension, and runs a drop-in generate.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$repo"
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q "$work"/dist/gitfast-*.whl
cd "$work"  # nothing of the checkout on sys.path from here on

"$work/venv/bin/gitfast" caption "$("$py" -c 'from gitfast.defaults import EXAMPLES; print(EXAMPLES)')" \
  --out "$work/captions.jsonl"
"$work/venv/bin/gitfast" info --json > "$work/info.json"
"$py" - "$work" <<'PY'
import json, sys
from pathlib import Path

import torch
from PIL import Image

import gitfast
from gitfast.defaults import EMBEDDED_MODEL, EXAMPLES

work = Path(sys.argv[1])
assert Path(gitfast.__file__).is_relative_to(work / "venv"), gitfast.__file__
rows = [json.loads(line) for line in (work / "captions.jsonl").read_text().splitlines()]
assert len(rows) == len(list(EXAMPLES.glob("*.png"))) >= 8 and all(r["caption"] and not r["error"] for r in rows), rows
info = json.loads((work / "info.json").read_text())
assert info["extension"]["loaded"] is True, info["extension"]

from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL)
model = gitfast.GitForCausalLM.from_pretrained(EMBEDDED_MODEL)
image = Image.open(sorted(EXAMPLES.glob("*.png"))[0]).convert("RGB")
ids = model.generate(pixel_values=processor(images=image, return_tensors="pt").pixel_values, max_new_tokens=12)
caption = processor.batch_decode(ids, skip_special_tokens=True)[0]
assert caption == rows[0]["caption"], (caption, rows[0])
print(f"wheel check: {len(rows)} captioned, extension {info['extension']}, generate: {caption!r}")
PY
