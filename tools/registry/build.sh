#!/usr/bin/env bash
# Builds the CNCF distribution registry (the OCI registry the kind tier installs from;
# tools/go-tool.sh: cached by version) and prints its path on the last line.
#
#   REGISTRY_VERSION  the github.com/distribution/distribution/v3 module version (default below)
set -euo pipefail
VERSION=${REGISTRY_VERSION:-v3.1.2}
exec bash "$(dirname "$0")/../go-tool.sh" registry \
  github.com/distribution/distribution/v3/cmd/registry "$VERSION"
