#!/usr/bin/env bash
# Builds helm-docs (the chart README's values table, generated from values.yaml's `# --`
# comments) from the Go module proxy into a cache outside the repo, keyed by version, and
# prints the path of the binary on its last line. A second run only prints the path.
#
#   HELM_DOCS_VERSION  the github.com/norwoodj/helm-docs module version (default below)
#   UNWEDGE_CACHE      cache root (default ~/.cache/unwedge)
set -euo pipefail
VERSION=${HELM_DOCS_VERSION:-v1.14.2}
CACHE=${UNWEDGE_CACHE:-$HOME/.cache/unwedge}
BIN=$CACHE/bin/helm-docs-$VERSION
if [ -x "$BIN/helm-docs" ]; then echo "$BIN/helm-docs"; exit 0; fi
mkdir -p "$BIN"
# One build at a time: a concurrent caller waits for the first and reuses its result.
exec 9>"$BIN/.lock"
flock 9
if [ ! -x "$BIN/helm-docs" ]; then
  echo "helm-docs: go install github.com/norwoodj/helm-docs/cmd/helm-docs@$VERSION" >&2
  GOBIN=$BIN.tmp GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
    go install -ldflags "-s -w" "github.com/norwoodj/helm-docs/cmd/helm-docs@$VERSION"
  mv "$BIN.tmp/helm-docs" "$BIN/helm-docs"
  rmdir "$BIN.tmp"
fi
echo "$BIN/helm-docs"
