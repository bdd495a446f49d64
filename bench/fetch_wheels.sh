#!/usr/bin/env bash
# Here (with network), before a GPU call: the wheels the GPU machine lacks, into .whl/ (git-ignored),
# carried to it with `carry=[".whl"]`. transformers 5.18: the GPU image's 5.17 generates wrong GIT
# tokens once the KV cache is used (gitfast/compat.py); gpu_session.sh installs it --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps -d .whl/ transformers==5.18.0
ls -l .whl/
