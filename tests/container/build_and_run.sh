#!/usr/bin/env bash
# Build the project's Dockerfile with buildah (no Docker engine needed) on a
# local stand-in of the PyTorch base image, then run the sample workflow inside
# the built image with a tiny configuration, the way
#   docker run --ipc=host -v "$PWD/data:/workspace/data" -v "$PWD/reports:/workspace/reports" IMAGE ARGS
# would, and check what it wrote. Every step is timed.
#
# Usage (as root, from anywhere):  bash tests/container/build_and_run.sh [EXTRA SNAKEMAKE ARGS]
# Environment:
#   WORK        scratch folder (default /var/tmp/imgembed-container): base root
#               file system, wheels, run folders, logs
#   BASE_IMAGE  base image to build on (default localhost/imgembed-base:test,
#               made by make_base_image.sh when missing)
#   IMAGE       tag of the built image (default localhost/imgembed:test)
#   TINY_CONFIG configuration merged over config/config.yaml for the run
#               (default tests/fixtures/tiny.yaml)
#   KEEP_RUN=1  keep the previous run's outputs (default: start from empty folders)
#   CONTEXT     build context (default: the repository this script is in)
# Idempotent: reuses the base image, buildah's layer cache and installed tools.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${WORK:-/var/tmp/imgembed-container}
BASE_IMAGE=${BASE_IMAGE:-localhost/imgembed-base:test}
IMAGE=${IMAGE:-localhost/imgembed:test}
TINY_CONFIG=${TINY_CONFIG:-$REPO/tests/fixtures/tiny.yaml}
CONTEXT=${CONTEXT:-$REPO}
RUN_DIR=$WORK/run
LOGS=$WORK/logs
APP_UID=1000   # the Dockerfile's default runtime user
mkdir -p "$WORK" "$LOGS"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
TIMINGS=()
step() {  # step NAME CMD... : run and time one step
  local name=$1 t0=$SECONDS; shift
  log "start: $name"
  "$@"
  TIMINGS+=("$(printf '%5d s  %s' $((SECONDS - t0)) "$name")")
  log "done:  $name ($((SECONDS - t0)) s)"
}

install_tools() {
  if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y buildah debootstrap
  fi
  # buildah's default nofile/nproc ulimits cannot be set inside this kind of
  # sandbox; an empty list keeps the caller's.
  local conf=/etc/containers/containers.conf
  if ! grep -qs '^default_ulimits *= *\[\]' "$conf"; then
    mkdir -p /etc/containers
    if grep -qs '^\[containers\]' "$conf"; then
      sed -i 's/^\[containers\]/[containers]\ndefault_ulimits = []/' "$conf"
    else
      printf '[containers]\ndefault_ulimits = []\n' >> "$conf"
    fi
  fi
  buildah --version
}

base_image() {
  BASE_IMAGE=$BASE_IMAGE WORK=$WORK bash "$REPO/tests/container/make_base_image.sh"
}

lint() {
  local hadolint
  hadolint=$(command -v hadolint || echo "$REPO/.venv/bin/hadolint")
  if [[ -x $hadolint ]]; then
    "$hadolint" "$CONTEXT/Dockerfile" && log "hadolint: no findings"
  else
    log "hadolint not found; skipped"
  fi
}

build() {
  local revision
  revision=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  buildah bud --isolation chroot --layers --force-rm \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg REVISION="$revision" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --format docker `# OCI format would drop SHELL (bash -o pipefail)` \
    -t "$IMAGE" -f "$CONTEXT/Dockerfile" "$CONTEXT" 2>&1 | tee "$LOGS/build.log"
}

inspect() {
  buildah inspect --type image --format \
'user={{.OCIv1.Config.User}} workdir={{.OCIv1.Config.WorkingDir}}
entrypoint={{.OCIv1.Config.Entrypoint}} cmd={{.OCIv1.Config.Cmd}}
env={{.OCIv1.Config.Env}}
labels={{.OCIv1.Config.Labels}}' "$IMAGE"
  echo
  buildah images "$BASE_IMAGE"
  buildah images "$IMAGE" | tail -n +2
}

CTR=
cleanup() { if [[ -n $CTR ]]; then buildah rm "$CTR" >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

in_container() {  # in_container CMD... : run in a fresh container of $IMAGE, as its USER
  buildah run --isolation chroot \
    -v "$RUN_DIR/data:/workspace/data" \
    -v "$RUN_DIR/reports:/workspace/reports" \
    -v "$RUN_DIR/models:/workspace/models" \
    -v "$RUN_DIR/embeddings:/workspace/embeddings" \
    -v "$RUN_DIR/logs:/workspace/logs" \
    -v "$RUN_DIR/tiny.yaml:/workspace/tiny.yaml:ro" \
    "$CTR" -- "$@"
}

prepare_run() {
  if [[ ${KEEP_RUN:-0} != 1 ]]; then rm -rf "$RUN_DIR"; fi
  mkdir -p "$RUN_DIR"/{data,reports,models,embeddings,logs}
  cp "$TINY_CONFIG" "$RUN_DIR/tiny.yaml"
  chown -R "$APP_UID:$APP_UID" "$RUN_DIR"   # as a host user with uid 1000 would own them
  cleanup
  CTR=$(buildah from --pull-never "$IMAGE")
  in_container sh -c 'id; pwd; python -c "import torch, imgembed; print(\"torch\", torch.__version__, \"cuda available:\", torch.cuda.is_available())"'
}

sample_run() {
  # What the image's entrypoint does for `docker run IMAGE ARGS`.
  in_container /usr/local/bin/imgembed-entrypoint \
    --configfile config/config.yaml tiny.yaml "$@" 2>&1 | tee "$LOGS/sample_run.log"
}

other_invocations() {
  # `docker run IMAGE -n`: the entrypoint adds --cores all; the default config's plan.
  in_container /usr/local/bin/imgembed-entrypoint -n 2>&1 | tail -n 12
  # `docker run --user 4242:4242 IMAGE -n ...`: a uid without a passwd entry, in a
  # fresh container without mounts, must still find writable caches and /workspace.
  local ctr2
  ctr2=$(buildah from --pull-never "$IMAGE")
  buildah run --isolation chroot --user 4242:4242 "$ctr2" -- sh -c '
    id && python -c "import matplotlib.pyplot, timm, accelerate, imgembed; print(\"imports ok\")" &&
    /usr/local/bin/imgembed-entrypoint -n --configfile config/config.yaml' 2>&1 | tail -n 12
  buildah rm "$ctr2" >/dev/null
}

report() {
  log "outputs written through the mounts:"
  (cd "$RUN_DIR" && find . -type f ! -path './data/sample/*' | sort | head -100)
  local metrics
  metrics=$(find "$RUN_DIR/reports" -name metrics.json | sort)
  [[ -n $metrics ]] || { log "no metrics.json under reports/"; return 1; }
  for m in $metrics; do echo "== ${m#"$RUN_DIR"/}"; cat "$m"; echo; done
}

t_all=$SECONDS
step "install buildah/debootstrap" install_tools
step "base image ($BASE_IMAGE)" base_image
step "hadolint Dockerfile" lint
step "buildah bud -> $IMAGE" build
step "inspect image" inspect
step "prepare run folders + container" prepare_run
step "sample workflow in the container" sample_run "$@"
step "dry runs: no --cores given; as uid 4242" other_invocations
step "report" report
log "timings:"
printf '%s\n' "${TIMINGS[@]}" "$(printf '%5d s  total' $((SECONDS - t_all)))" | tee "$LOGS/timings.txt"
