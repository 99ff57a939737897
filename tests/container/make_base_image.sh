#!/usr/bin/env bash
# Build a local stand-in for the official PyTorch CUDA runtime image in a Docker
# engine, so the project's Dockerfile can be built and run on a machine that can
# reach only PyPI and the Debian mirror (no Docker Hub).
#
# The stand-in mimics what the Dockerfile relies on in pytorch/pytorch:*-runtime:
#   * a Python on PATH at /opt/conda/bin with pip, running as root;
#   * torch and torchvision already installed (here: PyPI's torch==2.14.1 and
#     torchvision==0.29.1 for CPython 3.11, which are CUDA builds that also run on CPU);
#   * WORKDIR /workspace.
# Where this machine reaches PyPI through a TLS-inspecting proxy, pip in the
# container must trust the same certificates as the host: the host's CA bundle
# ($HOST_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt) is copied into
# the image and named in PIP_CERT / SSL_CERT_FILE / REQUESTS_CA_BUNDLE. (A real
# machine behind such a proxy would have to do the same for the real base.)
# It is a minbase Debian 12 (bookworm) root file system from debootstrap,
# imported into the running Docker daemon with `docker import` as $BASE_IMAGE.
#
# Idempotent: exits at once when $BASE_IMAGE already exists (FORCE=1 rebuilds),
# and reuses an already bootstrapped root file system and downloaded wheels.
# Needs root, debootstrap and a running Docker daemon:
#   apt-get update && apt-get install -y docker.io debootstrap
#   dockerd --iptables=false --ip6tables=false --bridge=none > /tmp/dockerd.log 2>&1 &
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-imgembed-base:test}
WORK=${WORK:-/var/tmp/imgembed-container}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
ROOTFS=$WORK/rootfs
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WHEELS=$WORK/wheels

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
step() {  # step NAME CMD... : run and time one step
  local name=$1 t0=$SECONDS; shift
  log "start: $name"
  "$@"
  log "done:  $name ($((SECONDS - t0)) s)"
}

if [[ ${FORCE:-0} != 1 ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "$BASE_IMAGE already exists; nothing to do (FORCE=1 rebuilds it)"
  exit 0
fi
mkdir -p "$WORK"

bootstrap() {
  if [[ -e $ROOTFS/.bootstrap-done ]]; then log "reusing $ROOTFS"; return; fi
  rm -rf "$ROOTFS"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR"
  touch "$ROOTFS/.bootstrap-done"
}

download_wheels() {
  # The host's pip (its own config may point at local wheel mirrors) fetches the
  # wheels with all their dependencies. The host must match the root file system:
  # CPython 3.11 on x86_64 Linux (Debian 12's python3 is 3.11), checked here.
  python3 -c 'import sys, platform; assert sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64", "need CPython 3.11 on x86_64 to download the wheels"'
  mkdir -p "$WHEELS"
  python3 -m pip download --quiet --only-binary=:all: -d "$WHEELS" \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
}

install_torch() {
  # Hard links put the wheels inside the root file system without copying.
  rm -rf "$ROOTFS/tmp/wheels"
  cp -al "$WHEELS" "$ROOTFS/tmp/wheels" 2>/dev/null || cp -a "$WHEELS" "$ROOTFS/tmp/wheels"
  chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    /bin/sh -euc "
      [ -x /opt/conda/bin/python ] || python3 -m venv /opt/conda
      /opt/conda/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        'torch==$TORCH_VERSION' 'torchvision==$TORCHVISION_VERSION'
      /opt/conda/bin/python -c 'import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__)'
      mkdir -p /workspace
      apt-get clean
      rm -rf /var/lib/apt/lists/* /tmp/wheels /root/.cache
    "
}

import_image() {
  cp "$HOST_CA_BUNDLE" "$ROOTFS/etc/ssl/certs/host-ca-bundle.crt"
  tar -C "$ROOTFS" --exclude=./.bootstrap-done -cf - . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt' \
    --change 'ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'WORKDIR /workspace' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.opencontainers.image.description=\"Local stand-in for pytorch/pytorch runtime (Debian 12, torch $TORCH_VERSION)\"" \
    - "$BASE_IMAGE"
}

step debootstrap bootstrap
step "pip download torch/torchvision wheels" download_wheels
step "install torch into /opt/conda" install_torch
step "import as $BASE_IMAGE" import_image
docker image ls "$BASE_IMAGE"
