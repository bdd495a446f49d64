#!/usr/bin/env bash
# On a machine with network access: download the wheels a GPU machine without network needs into DIR
# (default .whl/ in the checkout, which git ignores). Copy DIR to the GPU machine beside the checkout
# and pass it to bench/gpu_session.sh --wheels DIR, which installs them with pip --no-index.
#
#   bash bench/fetch_wheels.sh [DIR]
#
# Today that is transformers 5.24.0, gitfast's oldest supported release (gitfast/checkpoint/compat.py): a GPU
# image with transformers 5.0-5.17 generates wrong GIT tokens once the KV cache is used. Only the wheel
# itself is fetched (--no-deps); its dependencies (huggingface_hub, tokenizers) must already be on the
# GPU machine, as they are wherever an older transformers 5 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python3 -m pip download -q --no-deps -d "$dest" transformers==5.24.0
ls -l "$dest"
