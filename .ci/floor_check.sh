#!/usr/bin/env bash
# CI, after the tests: the transformers floor that pyproject.toml declares (5.24) still passes the tests
# that compare gitfast with transformers or go through its classes. A virtual environment over the
# installed one, where only transformers (and what it pins) differs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
floor=$(sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' "$repo/pyproject.toml")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q "transformers==$floor"
cd "$repo"
"$work/venv/bin/python" - "$floor" <<'PY'
import sys, transformers
from packaging.version import Version
assert Version(transformers.__version__) == Version(sys.argv[1]), transformers.__version__
PY
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_loading.py tests/test_compat.py \
  tests/test_drop_in_forward.py tests/test_drop_in_generate_options.py tests/test_drop_in_init.py \
  tests/test_drop_in_embeds.py tests/test_captioner.py
