#!/usr/bin/env bash
# Builds the unwedge images from the static musl binaries, FROM scratch: nothing is pulled.
#
#   images/build.sh [TAG]        (default TAG: dev) -> unwedge/agent:TAG, unwedge/operator:TAG
#   images/build.sh --binaries   only the static binaries (.ci/run builds them while Go builds)
#
# Starts dockerd when `docker info` fails (Debian's docker.io), builds with the classic builder
# (DOCKER_BUILDKIT=0: no BuildKit frontend image to pull), checks that each image runs its
# binary's --version, and prints the image sizes. UNWEDGE_IMAGE_SAVE=<dir> also writes
# <dir>/unwedge-{agent,operator}.tar (docker save), e.g. for `kind load image-archive`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
tag=${1:-dev}
target=x86_64-unknown-linux-musl
log() { echo "images/build.sh: $*" >&2; }

ensure_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  if ! command -v dockerd >/dev/null 2>&1; then
    log "dockerd is missing: apt-get install docker.io"
    exit 1
  fi
  log "starting dockerd (log: /tmp/unwedge-dockerd.log)"
  # Detached on purpose: the daemon outlives this script so later builds and kind reuse it.
  nohup dockerd >/tmp/unwedge-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then return; fi
    sleep 1
  done
  log "dockerd did not come up within 60s; see /tmp/unwedge-dockerd.log"
  exit 1
}

if ! rustup target list --installed | grep -qx "$target"; then
  log "adding the rust target $target"
  rustup target add "$target"
fi
command -v musl-gcc >/dev/null 2>&1 || { log "musl-gcc is missing: apt-get install musl-tools"; exit 1; }

log "cargo build --release --target $target"
( cd "$root" && cargo build --release --target "$target" -p unwedge-agent -p unwedge-operator )
[ "$tag" != --binaries ] || exit 0
bin_dir=${CARGO_TARGET_DIR:-$root/target}/$target/release

ensure_docker
export DOCKER_BUILDKIT=0
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
status=0
for component in agent operator; do
  binary=unwedge-$component
  image=unwedge/$component:$tag
  mkdir -p "$ctx/$component"
  cp "$here/$component/Dockerfile" "$bin_dir/$binary" "$ctx/$component/"
  log "docker build $image"
  docker build --quiet -t "$image" "$ctx/$component" >/dev/null
  if version=$(docker run --rm --network none "$image" --version 2>&1); then
    log "$image --version: $version"
  else
    log "$image --version FAILED: $version"
    status=1
  fi
  if [ -n "${UNWEDGE_IMAGE_SAVE:-}" ]; then
    mkdir -p "$UNWEDGE_IMAGE_SAVE"
    docker save -o "$UNWEDGE_IMAGE_SAVE/$binary.tar" "$image"
  fi
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^unwedge/(agent|operator):$tag " || true
exit $status
