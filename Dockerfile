# clt-pipe for GPU batch jobs: the package installed, `clt-pipe` as entrypoint. Stores and datasets come in
# as mounts (/data, /stores, /runs) or object-store URLs (s3://...).
# BASE: any Debian-like image whose `python`/`pip` are Python >= 3.11. The default has no torch, so pip
# installs the torch constraints.txt pins and the tests run (PyPI's Linux wheel brings its own CUDA
# libraries: a GPU node needs only the driver). A base that already has a CUDA torch build (e.g. a
# pytorch/pytorch image) keeps it. CI builds this file on a Debian base bootstrapped from Debian's packages
# (.ci/docker/base.sh) because no registry image can be pulled there.
ARG BASE=python:3.12-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLT_PIPE_STORES=/stores \
    CLT_PIPE_RUNS=/runs

WORKDIR /opt/clt-pipe
COPY pyproject.toml README.md constraints.txt ./
COPY clt_pipe ./clt_pipe
COPY pipelines ./pipelines
COPY storage/FORMAT.md ./storage/FORMAT.md
# The local package is the thing being installed, so DL3013's version pin does not apply.
# hadolint ignore=DL3013
RUN if python -c "import torch" 2>/dev/null; then pip install ".[s3]"; \
    else pip install -c constraints.txt ".[s3]"; fi \
    && useradd --create-home --uid 1000 clt \
    && mkdir -p /stores /runs /data \
    && chown clt:clt /stores /runs

USER 1000:1000
WORKDIR /home/clt
ENTRYPOINT ["clt-pipe"]
CMD ["--help"]
