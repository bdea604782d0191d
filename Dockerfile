# The image the cluster/ manifests run: the pinned stack, the project, a non-root user.
# torch is installed first and pinned, exactly as .ci/setup does, so no other package resolves it.
# Its wheel brings CUDA 13.0's libraries (cuda-toolkit 13.0.3, cuDNN and NCCL for cu13), so the base
# is CUDA's minimal image of that version: it adds the driver requirement (NVIDIA_REQUIRE_CUDA
# cuda>=13.0), so a node whose driver is older than r580 refuses the container at its start rather
# than torch failing at its first GPU call, and no second, unused copy of CUDA 12's libraries.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Ubuntu 24.04's Python 3.12, with headers and a C compiler (Triton and DeepSpeed build small
# extensions at run time), and wget (KubeRay's probe and submitter commands call it).
# The upstream versions are pinned; the Ubuntu revision floats so security updates still apply.
# uid 1001: the base image already has user `ubuntu` at 1000; the manifests run as 1001.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3=3.12.3-* python3-venv=3.12.3-* python3-dev=3.12.3-* \
        build-essential=12.10ubuntu* wget=1.21.4-* \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --gid 1001 alterrec \
    && useradd --create-home --uid 1001 --gid 1001 alterrec

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY alterrec_dist ./alterrec_dist
# Editable: relative paths in configs (shards/, runs/) resolve against /app, the project root.
# pip, setuptools and wheel first, as .ci/setup pins them: DeepSpeed's sdist is built without isolation,
# against them and the torch above.
RUN pip install pip==26.3 setuptools==84.2.1 wheel==0.48.0 \
    && pip install -c constraints.txt torch==2.13.0 \
    && DS_BUILD_OPS=0 pip install -c constraints.txt --no-build-isolation deepspeed==0.19.8 \
    && pip install -c constraints.txt -e ".[mlflow]" \
    && chown alterrec:alterrec /app
COPY configs ./configs
COPY shards ./shards
USER 1001:1001
ENTRYPOINT ["python", "-m", "alterrec_dist.train"]
CMD ["--config", "configs/default.toml"]
