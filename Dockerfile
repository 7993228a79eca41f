# syntax=docker/dockerfile:1
# chat on the CPU. Build and run (see docs/packaging.md):
#   docker build -t chat .
#   docker run -it --rm -v chat-data:/data chat --model gpt2
#   docker run -it --rm -v "$PWD/models:/models:ro" chat --model /models/smollm2-135m-instruct
#
# Pins: requirements/torch.txt (torch, taken from PyTorch's CPU-only wheel index, not PyPI's CUDA build)
# and requirements/runtime.txt (everything else), the files CI installs from.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment in /opt/chat with the pinned dependencies and the package ----
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A CA bundle for pip, where the build's network is behind a proxy that signs TLS (tools/image_test.py).
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/chat

# Dependencies first, in a layer of their own, so that editing chat/ does not reinstall torch.
# torch comes without its dependencies: runtime.txt pins them, and `pip check` below proves the set.
COPY requirements/torch.txt requirements/runtime.txt requirements/
RUN /opt/chat/bin/pip install --no-deps --index-url "${TORCH_INDEX_URL}" -r requirements/torch.txt \
    && /opt/chat/bin/pip install -r requirements/runtime.txt

# The package itself, without dev extras; its dependencies are all pinned above.
COPY pyproject.toml README.md ./
COPY chat/ chat/
RUN /opt/chat/bin/pip install --no-deps /src \
    && /opt/chat/bin/pip check \
    && /opt/chat/bin/python -c "import torch; assert not torch.version.cuda, 'CPU torch expected'"

# chat's native CPU kernels (chat/native), compiled against this torch into the installed package, where
# chat looks first: the runtime image needs no compiler. g++ stays in this stage only. -P: not the source
# tree in this WORKDIR, whose chat/native/lib the runtime stage never copies.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && /opt/chat/bin/python -P -m chat.native \
        --into="$(/opt/chat/bin/python -P -c 'from chat import native; print(native.PACKAGED)')" \
    && /opt/chat/bin/python -P -c "from chat import native; assert (native.PACKAGED / native.library_name()).is_file()"

# ---- runtime: the slim base, the virtual environment, a non-root user ----
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="chat" \
      org.opencontainers.image.description="A terminal chat for Hugging Face causal language models (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric user, so that `USER` works with runAsNonRoot checks and bind mounts can be matched with
# `docker run --user`. /data holds downloaded models (HF_HOME); /models is where model directories
# and TorchScript artifacts are mounted, read-only.
ARG UID=10001
ARG GID=10001
RUN groupadd --gid "${GID}" chat \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --home-dir /home/chat --shell /usr/sbin/nologin chat \
    && mkdir -p /data /models \
    && chown "${UID}:${GID}" /data

COPY --from=build /opt/chat /opt/chat
# The exporter's thin entry, beside `docker run --entrypoint python IMAGE -m chat.export ...` (docs/packaging.md).
COPY scripts/export_torchscript.py /opt/chat/scripts/export_torchscript.py

# /data, a volume, keeps downloaded models (HF_HOME), the chats (XDG_DATA_HOME: chat/sessions) and the
# artifacts exported on first use (XDG_CACHE_HOME: chat/artifacts).
ENV PATH=/opt/chat/bin:${PATH} \
    HF_HOME=/data \
    XDG_DATA_HOME=/data \
    XDG_CACHE_HOME=/data/cache \
    XDG_STATE_HOME=/data/state \
    CHAT_DEMO_MODEL=/models/smollm2-135m-instruct \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

VOLUME ["/data"]
WORKDIR /home/chat
USER ${UID}:${GID}

ENTRYPOINT ["chat"]
