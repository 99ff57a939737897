#!/usr/bin/env bash
# Run the README's Docker commands as a new user would: on a fresh clone, with a real Docker
# daemon, for a host user that is root, uid 1000 and another uid, and check that the outputs
# appear on the host and that this user can read, overwrite and delete them.
#
# The commands are read from the ```bash block of the README's "## Docker" section and run as
# they are, except that (no NVIDIA runtime, no registry, no network here):
#   docker build  gets  --network host --build-arg BASE_IMAGE=$BASE_IMAGE (the local stand-in
#                       made by make_base_image.sh: Debian + PyPI torch)
#   docker run    loses --gpus all and gets --network none
# and, to keep each run short, `docker run` also mounts tests/fixtures/tiny.yaml and passes
# `--configfile config/config.yaml tiny.yaml` (FULL=1: also run the exact command once as root,
# with the default config: several minutes of training).
# Then, for one non-root uid, a reports/ folder owned by root (what the daemon creates for a
# missing bind-mount folder) must stop the container at once with one line naming it.
#
# Usage (as root, with dockerd running):  bash tests/container/build_and_run.sh
# Environment: WORK (scratch, default /var/tmp/imgembed-docker), BASE_IMAGE (default
# imgembed-base:test), UIDS (default "0 1000 4243"; empty: none), FULL=1.
# The clone is of this repository's committed HEAD (git clone), as a user would get it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${WORK:-/var/tmp/imgembed-docker}
BASE_IMAGE=${BASE_IMAGE:-imgembed-base:test}
UIDS=${UIDS-0 1000 4243}
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}   # the classic builder: no buildx plugin needed
FAILED=0

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
ok() { log "ok:   $*"; }
fail() { log "FAIL: $*"; FAILED=1; }

docker info --format 'docker {{.ServerVersion}}, storage {{.Driver}}' \
  || { log "no Docker daemon: start one (dockerd --iptables=false --ip6tables=false --bridge=none &)"; exit 1; }
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || BASE_IMAGE=$BASE_IMAGE bash "$REPO/tests/container/make_base_image.sh"

# The README block, with this machine's substitutions.
readme_block() {
  awk '/^## Docker/{s=1; next} s && /^## /{exit} s && /^```bash/{b=1; next} b && /^```/{exit} b' "$REPO/README.md"
}
adapt() {  # $1 = tiny|full
  local tiny='-v "$PWD/tiny.yaml:/workspace/tiny.yaml:ro" imgembed --configfile config/config.yaml tiny.yaml'
  sed -e "s|docker build |docker build --network host --build-arg BASE_IMAGE=$BASE_IMAGE |" \
      -e 's|docker run --rm --gpus all |docker run --rm --network none |' \
      -e 's|--gpus all ||' \
      | if [[ $1 == tiny ]]; then sed -e "s|\" imgembed\$|\" $tiny|"; else cat; fi
}
log "README commands:"; readme_block | sed 's/^/    /' >&2
[[ $(readme_block | grep -c 'docker run') -ge 1 ]] || { log "no docker run in the README's Docker block"; exit 1; }

as_user() {  # as_user UID DIR CMD : run CMD with bash in DIR as that uid (gid = uid), in the docker group
  local uid=$1 dir=$2; shift 2
  if [[ $uid == 0 ]]; then (cd "$dir" && bash -euo pipefail -c "$*"); return; fi
  setpriv --reuid="$uid" --regid="$uid" --groups="$(getent group docker | cut -d: -f3)" \
    env HOME="$WORK/home-$uid" USER="u$uid" bash -euo pipefail -c "cd '$dir' && $*"
}

fresh_clone() {  # fresh_clone UID -> prints the clone's path, owned by UID
  local uid=$1
  local dir=$WORK/clone-$uid
  rm -rf "$dir" "$WORK/home-$uid"
  git clone --quiet "$REPO" "$dir"
  cp "$REPO/tests/fixtures/tiny.yaml" "$dir/tiny.yaml"
  mkdir -p "$WORK/home-$uid"
  chown -R "$uid:$uid" "$dir" "$WORK/home-$uid"
  echo "$dir"
}

check_outputs() {  # check_outputs UID DIR
  local uid=$1 dir=$2 f
  for f in data/sample.zip data/sample/manifest.json reports/sample/metrics.json reports/sample/plots/embedding.png; do
    [[ -s $dir/$f ]] && ok "uid $uid: $f on the host" || fail "uid $uid: $f missing"
  done
  local foreign
  foreign=$(find "$dir/data" "$dir/reports" ! -user "$uid" -printf '%u %p\n' | head -5)
  [[ -z $foreign ]] && ok "uid $uid: everything under data/ and reports/ is owned by uid $uid" \
    || fail "uid $uid: not owned by $uid: $foreign"
  if as_user "$uid" "$dir" 'cat reports/sample/metrics.json > /dev/null && echo "{}" > reports/sample/metrics.json && rm -r data/sample data/sample.zip reports/sample'; then
    ok "uid $uid: read, overwrote and deleted the outputs as that user"
  else
    fail "uid $uid: could not read/overwrite/delete the outputs as that user"
  fi
}

mkdir -p "$WORK"
for uid in $UIDS; do
  log "===== host user uid $uid: fresh clone, README commands (tiny config)"
  dir=$(fresh_clone "$uid")
  t0=$SECONDS
  if as_user "$uid" "$dir" "$(readme_block | adapt tiny)" > "$WORK/run-$uid.log" 2>&1; then
    ok "uid $uid: README commands exited 0 ($((SECONDS - t0)) s)"
  else
    fail "uid $uid: README commands failed ($((SECONDS - t0)) s); last lines:"; tail -n 15 "$WORK/run-$uid.log" >&2
  fi
  check_outputs "$uid" "$dir"
done

nonroot=$(for uid in $UIDS; do [[ $uid != 0 ]] && echo "$uid"; done | tail -n 1)
if [[ -n $nonroot ]]; then
  log "===== uid $nonroot with a reports/ folder owned by root (as the daemon makes a missing one)"
  dir=$WORK/clone-$nonroot
  rm -rf "$dir/reports"; mkdir "$dir/reports"   # as root
  set +e
  as_user "$nonroot" "$dir" "$(readme_block | grep -v '^mkdir' | adapt tiny)" > "$WORK/unwritable.log" 2>&1
  rc=$?
  set -e
  last=$(tail -n 1 "$WORK/unwritable.log")
  log "exit $rc, last line: $last"
  [[ $rc -ne 0 && $last == "imgembed: /workspace/reports is not writable by uid $nonroot"* ]] \
    && ! grep -q Traceback "$WORK/unwritable.log" \
    && ok "unwritable mount: one line naming /workspace/reports and the fix, exit $rc" || fail "unwritable mount: see $WORK/unwritable.log"
fi

log "===== doctor and --version in the image"
docker run --rm --network none imgembed doctor && ok "doctor exit 0 (train.accelerate: auto, no GPU)" || fail "doctor"
docker run --rm --network none --user 4243:4243 imgembed imgembed --version || fail "--version"

if [[ ${FULL:-0} == 1 ]]; then
  log "===== root: the exact README commands, default config"
  dir=$(fresh_clone 0)
  t0=$SECONDS
  if as_user 0 "$dir" "$(readme_block | adapt full)" > "$WORK/full-0.log" 2>&1; then
    ok "root, default config: exited 0 ($((SECONDS - t0)) s)"; cat "$dir/reports/sample/metrics.json" >&2; echo >&2
  else
    fail "root, default config ($((SECONDS - t0)) s)"; tail -n 15 "$WORK/full-0.log" >&2
  fi
  check_outputs 0 "$dir"
fi

[[ $FAILED == 0 ]] && log "all checks passed" || { log "some checks FAILED"; exit 1; }
