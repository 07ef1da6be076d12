#!/usr/bin/env bash
# A Debian base image for CI's build of the shipped Dockerfile (`--build-arg BASE=clt-pipe-ci-base`): the GPU
# base images cannot be pulled here, Debian's packages can. Python 3.11 from bookworm with a venv on PATH
# (Debian's own pip refuses system-wide installs), and the machine's CA bundle and pip settings, so pip in
# the build reaches the package index the way the host's pip does.
#   .ci/docker/base.sh [TAG]          (default clt-pipe-ci-base; ~1 min)
set -euo pipefail
TAG=${1:-clt-pipe-ci-base}
tar=$(mktemp --suffix=.tar)
trap 'rm -f "$tar"' EXIT
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
mmdebstrap --quiet --variant=apt --include=python3,python3-venv,python3-pip,ca-certificates \
  --customize-hook="cp '$ca' \"\$1/etc/ssl/certs/ca-certificates.crt\"" \
  --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndefault-timeout = 180\n" > "$1/etc/pip.conf"' \
  --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
  bookworm "$tar"
docker import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' "$tar" "$TAG" >/dev/null
echo "base image $TAG: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
