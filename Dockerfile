# One image for both roles: `bertstream-producer` and `bertstream-trainer` are its console scripts.
# The official PyTorch CUDA runtime image already has torch, so pip keeps it and adds only the rest.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache

WORKDIR /opt/bertstream
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY trainer ./trainer
RUN pip install --no-cache-dir ".[tensorboard]" \
    && bertstream-producer --help >/dev/null \
    && bertstream-trainer --help >/dev/null

# The trainer's stream port inside the compose network (one port per local rank from 5555 up).
EXPOSE 5555
CMD ["bertstream-trainer", "--help"]
