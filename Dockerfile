# The image the cluster/ manifests run: CUDA runtime, the pinned stack, the project, a non-root user.
# torch is installed first and pinned, exactly as .ci/setup does, so no other package resolves it.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

RUN useradd --create-home --uid 1000 alterrec
WORKDIR /app
COPY pyproject.toml README.md ./
COPY alterrec_dist ./alterrec_dist
# Editable: relative paths in configs (shards/, runs/) resolve against /app, the project root.
RUN pip install torch==2.13.0 \
    && DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8 \
    && pip install -e . \
    && chown alterrec /app
COPY configs ./configs
COPY shards ./shards
USER alterrec
ENTRYPOINT ["python", "-m", "alterrec_dist.train"]
CMD ["--config", "configs/default.toml"]
