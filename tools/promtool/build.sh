#!/usr/bin/env bash
# Builds promtool from the Go module proxy into a cache outside the repo, keyed by version,
# and prints the path of the binary on its last line. A second run only prints the path.
#
#   PROMTOOL_VERSION  the github.com/prometheus/prometheus module version (default below;
#                     Prometheus 3.x tags v3.N.M as module version v0.3NN.M)
#   UNWEDGE_CACHE     cache root (default ~/.cache/unwedge)
set -euo pipefail
VERSION=${PROMTOOL_VERSION:-v0.316.0}
CACHE=${UNWEDGE_CACHE:-$HOME/.cache/unwedge}
BIN=$CACHE/bin/promtool-$VERSION
if [ -x "$BIN/promtool" ]; then echo "$BIN/promtool"; exit 0; fi
mkdir -p "$BIN"
# One build at a time: a concurrent caller waits for the first and reuses its result.
exec 9>"$BIN/.lock"
flock 9
if [ ! -x "$BIN/promtool" ]; then
  echo "promtool: go install github.com/prometheus/prometheus/cmd/promtool@$VERSION" >&2
  GOBIN=$BIN.tmp GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
    go install -ldflags "-s -w -X github.com/prometheus/common/version.Version=$VERSION" \
    "github.com/prometheus/prometheus/cmd/promtool@$VERSION"
  mv "$BIN.tmp/promtool" "$BIN/promtool"
  rmdir "$BIN.tmp"
fi
echo "$BIN/promtool"
