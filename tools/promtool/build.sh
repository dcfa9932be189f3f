#!/usr/bin/env bash
# Builds promtool (tools/go-tool.sh: cached by version) and prints its path on the last line.
#
#   PROMTOOL_VERSION  the github.com/prometheus/prometheus module version (default below;
#                     Prometheus 3.x tags v3.N.M as module version v0.3NN.M)
set -euo pipefail
VERSION=${PROMTOOL_VERSION:-v0.316.0}
exec bash "$(dirname "$0")/../go-tool.sh" promtool \
  github.com/prometheus/prometheus/cmd/promtool "$VERSION" \
  "-X github.com/prometheus/common/version.Version=$VERSION"
