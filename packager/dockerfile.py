"""Render a submission's Dockerfile from its spec (generation only; no building here).

One Dockerfile serves every route to an image:
- online (the challenge): base image from the table, requirements from PyPI,
  weights downloaded at build time at the spec's revisions;
- offline (air-gapped, CI): `--build-arg BASE_IMAGE=<local image>`, a
  `wheelhouse/` folder beside the Dockerfile, `--build-arg FETCH_MODELS=0` and
  the model mounted at run time on the same `MODEL_PATH`.
A Hub token enters only as a BuildKit secret (`--secret id=hf_token`): never
ARG, ENV or a file in a layer.
"""

from __future__ import annotations

from .base_images import BaseImage
from .spec import Spec

MODELS_DIR = "/models"
SERVER_UID = 10001  # the server's user: never root
KERNELS_DIR = "/opt/gptq-kernels"  # helm_server/kernels.py: compiled by the image build, read-only at run time
WORKDIR = "/submission"


def render_dockerfile(spec: Spec, base: BaseImage, spec_sha256: str, packager_version: str) -> str:
    env_models = [f"MODEL_PATH={MODELS_DIR}/artifact"]
    if spec.adapter is not None:
        env_models.append(f"ADAPTER_PATH={MODELS_DIR}/adapter")
    port = spec.server.port
    adapter_convert = ""
    if spec.adapter is not None:
        adapter_convert = f" \\\n        && python -m pipeline.convert --in-place --adapter {MODELS_DIR}/adapter"
    return f"""\
# Rendered by packager {packager_version} from submissions/{spec.name}/spec.toml
# (sha256 {spec_sha256}). Edit the spec and rebuild, not this file.
# Build (BuildKit):  docker build -t {spec.name} .
# Private repos:     docker build --secret id=hf_token,env=HF_TOKEN -t {spec.name} .
# Offline:           docker build --build-arg BASE_IMAGE=<local image> --build-arg FETCH_MODELS=0 ...
#                    with the locked wheels in ./wheelhouse/ and the model mounted at {MODELS_DIR}/artifact
ARG BASE_IMAGE={base.image}
FROM ${{BASE_IMAGE}}

ENV PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    HF_HUB_DISABLE_TELEMETRY=1 \\
    HF_HUB_OFFLINE=1
WORKDIR {WORKDIR}

# Layers in the order their inputs change, so that editing the spec's generation settings (or
# a comment) rebuilds seconds of work, not the requirements or the weights.
#
# 1. Locked requirements, keyed by the lock and ./wheelhouse/ alone. The lock is the whole
# closure (installed without resolution); torch ({base.torch}) comes with the base image.
# Wheels in ./wheelhouse/ (offline builds put the lock's wheels there) make this step offline.
# Online, gcc and the PCRE2 headers build GPTQModel's pypcre; gcc stays, as nvcc's host
# compiler for the kernel build below.
RUN --mount=type=bind,source=requirements.txt,target=/tmp/build/requirements.txt \\
    --mount=type=bind,source=wheelhouse,target=/tmp/build/wheelhouse \\
    if ls /tmp/build/wheelhouse/*.whl >/dev/null 2>&1; then \\
        python -m pip install --no-deps --no-index --find-links /tmp/build/wheelhouse -r /tmp/build/requirements.txt; \\
    else \\
        apt-get update && apt-get install -y --no-install-recommends build-essential libpcre2-dev \\
        && rm -rf /var/lib/apt/lists/* \\
        && python -m pip install --no-deps -r /tmp/build/requirements.txt; \\
    fi \\
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 2. GPTQ kernels, compiled here for the RTX 4090 (sm_89) and Hopper (sm_90), keyed by the lock and
# helm_server/kernels.py alone: the server loads them at start and never runs a compiler (GPTQModel
# would compile Marlin at first use: minutes inside the evaluation's clock). nvcc needs no GPU.
# A CPU base records that it has nothing to compile.
COPY helm_server/__init__.py helm_server/kernels.py ./helm_server/
RUN python -m helm_server.kernels build {KERNELS_DIR}

# 3. Weights at the spec's revisions, keyed by the model references (models.json) and the
# converter: fetched once at build time; the token is a build secret. A Qwen (v1) artifact or
# adapter is converted to the Qwen2 layout here, offline: no remote code.
COPY models.json ./
COPY helm_server/__init__.py helm_server/settings.py helm_server/fetch.py ./helm_server/
COPY pipeline/ ./pipeline/
COPY packager/ ./packager/
ARG FETCH_MODELS=1
RUN --mount=type=secret,id=hf_token,required=false \\
    if [ "$FETCH_MODELS" = "1" ]; then \\
        HF_HUB_OFFLINE=0 python -m helm_server.fetch models.json {MODELS_DIR} \\
        && python -m pipeline.convert --in-place {MODELS_DIR}/artifact{adapter_convert}; \\
    else \\
        echo "FETCH_MODELS=$FETCH_MODELS: mount the model at {MODELS_DIR}/artifact at run time"; \\
        if [ -s /run/secrets/hf_token ]; then echo "a hub token was provided as a build secret (unused)"; fi; \\
    fi

# 4. The server and its configuration: change most often, cost nothing to rebuild.
COPY serve_config.json main.py MANIFEST.json ./
COPY helm_server/ ./helm_server/
LABEL org.llm-challenge.toolkit="packager" org.llm-challenge.submission="{spec.name}"
ENV {" ".join(env_models)}

# 5. An unprivileged user. Whatever the server writes (library caches) goes under /tmp, so the
# container also runs with a read-only root filesystem and a tmpfs at /tmp.
RUN useradd --system --uid {SERVER_UID} --home-dir /tmp --shell /usr/sbin/nologin server
ENV HOME=/tmp XDG_CACHE_HOME=/tmp/.cache TORCH_EXTENSIONS_DIR=/tmp/.cache/torch_extensions \\
    TRITON_CACHE_DIR=/tmp/.cache/triton HF_HOME=/tmp/.cache/huggingface \\
    GPTQMODEL_CACHE_DIR=/tmp/.cache/gptqmodel GPTQMODEL_TORCH_EXTENSIONS_DIR=/tmp/.cache/gptqmodel/torch_extensions \\
    HELM_SERVER_KERNELS={KERNELS_DIR}
USER {SERVER_UID}

EXPOSE {port}
HEALTHCHECK --interval=30s --timeout=10s --start-period=1200s --retries=3 \\
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=5)"
CMD ["uvicorn", "main:app", "--host", "0.0.0.0", "--port", "{port}"]
"""
