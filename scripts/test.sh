#!/usr/bin/env bash
# The test command: builds .venv from constraints.txt (the versions the image installs too, with the CPU
# wheel of the pinned torch) and bertstream with its test extras, then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k wire -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch first, as its CPU wheel: PyPI's Linux wheel of the pinned version is the multi-GB CUDA build. The
# CPU wheel (version 2.13.0+cpu, which pip ranks above 2.13.0) comes from pip's find-links on this machine,
# or from PyTorch's CPU index elsewhere: TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/test.sh
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt \
    ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
# tests/test_compose.py checks both compose file sets with `docker-compose config` (Debian's package is
# enough: no engine is needed). Installed here when missing and apt can do it; otherwise that test skips.
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
        apt-get install -y -qq --no-install-recommends docker-compose; } >/dev/null 2>&1 \
        || echo "scripts/test.sh: could not install docker-compose with apt-get; its test will skip" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
