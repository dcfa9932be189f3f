#!/usr/bin/env bash
# Builds a Go command from the Go module proxy into a cache outside the repo, keyed by version,
# and prints the path of the binary on its last line. A second run only prints the path.
#
#   tools/go-tool.sh NAME PACKAGE VERSION [LDFLAGS]
#     e.g. tools/go-tool.sh helm-docs github.com/norwoodj/helm-docs/cmd/helm-docs v1.14.2
#   UNWEDGE_CACHE  cache root (default ~/.cache/unwedge); the binary goes to bin/NAME-VERSION/NAME
set -euo pipefail
name=$1 package=$2 version=$3 ldflags=${4:-}
cache=${UNWEDGE_CACHE:-$HOME/.cache/unwedge}
dir=$cache/bin/$name-$version
if [ -x "$dir/$name" ]; then echo "$dir/$name"; exit 0; fi
mkdir -p "$dir"
# One build at a time: a concurrent caller waits for the first and reuses its result.
exec 9>"$dir/.lock"
flock 9
if [ ! -x "$dir/$name" ]; then
  echo "$name: go install $package@$version" >&2
  GOBIN=$dir.tmp GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
    go install -ldflags "-s -w $ldflags" "$package@$version"
  mv "$dir.tmp/$name" "$dir/$name"
  rmdir "$dir.tmp"
fi
echo "$dir/$name"
