#!/usr/bin/env bash
# Builds the static fake device plugin and podresources-list binaries and the image
# unwedge/fake-device-plugin:dev (FROM scratch, no pulls). Prints the binaries' directory.
set -euo pipefail
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
src=$KIND_DIR/fake-device-plugin
out=$KIND_WORK/fake-device-plugin
mkdir -p "$out"
cd "$src"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0
go build -trimpath -ldflags "-s -w" -o "$out/fake-device-plugin" .
go build -trimpath -ldflags "-s -w" -o "$out/podresources-list" ./cmd/podresources-list
cp Dockerfile "$out/"
ensure_docker
DOCKER_BUILDKIT=0 docker build -q -t "$PLUGIN_IMAGE" "$out" >/dev/null
echo "$out"
