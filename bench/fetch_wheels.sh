#!/usr/bin/env bash
# Here (with network), before a GPU call: the wheels the GPU machine lacks, into .whl/ (git-ignored),
# carried to it with `carry=[".whl"]`. transformers 5.24 (gitfast's floor, gitfast/compat.py): the GPU
# image's 5.17 generates wrong GIT tokens once the KV cache is used; gpu_session.sh installs it
# --no-index (its dependencies, huggingface_hub>=1.31 and tokenizers 0.23, are on that image).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps -d .whl/ transformers==5.24.0
ls -l .whl/
