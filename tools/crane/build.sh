#!/usr/bin/env bash
# Builds crane (pushes the OCI image layouts of images/build.sh to a registry, with the
# credentials of ~/.docker/config.json or `crane auth login`; tools/go-tool.sh: cached by
# version) and prints its path on the last line.
#
#   CRANE_VERSION  the github.com/google/go-containerregistry module version (default below)
set -euo pipefail
VERSION=${CRANE_VERSION:-v0.22.1}
exec bash "$(dirname "$0")/../go-tool.sh" crane \
  github.com/google/go-containerregistry/cmd/crane "$VERSION"
