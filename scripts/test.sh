#!/usr/bin/env bash
# The test command: builds .venv (CPU torch wheel, bertstream with its test extras) and runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k wire -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The CPU wheel first, pinned: an unpinned torch from PyPI is a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
