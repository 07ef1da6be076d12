# clt-pipe for GPU batch jobs: CUDA PyTorch base, the package installed, `clt-pipe` as entrypoint.
# Stores and datasets come in as mounts (/data, /stores, /runs) or object-store URLs (s3://...).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLT_PIPE_STORES=/stores \
    CLT_PIPE_RUNS=/runs

WORKDIR /opt/clt-pipe
COPY pyproject.toml README.md ./
COPY clt_pipe ./clt_pipe
COPY pipelines ./pipelines
COPY storage/FORMAT.md ./storage/FORMAT.md
# torch comes from the base image (its CUDA build); pip keeps it because pyproject's range admits it.
# The local package is the thing being installed, so DL3013's version pin does not apply.
# hadolint ignore=DL3013
RUN pip install ".[s3]" \
    && useradd --create-home --uid 1000 clt \
    && mkdir -p /stores /runs /data \
    && chown clt:clt /stores /runs

USER 1000:1000
WORKDIR /home/clt
ENTRYPOINT ["clt-pipe"]
CMD ["--help"]
