#!/usr/bin/env bash
# Builds krew, the kubectl plugin manager (tools/go-tool.sh: cached by version), and prints its
# path on the last line. The kind tier installs the released plugin with it, from the release's
# krew manifest and archive (`krew install --manifest --archive`: no index, no network).
#
#   KREW_VERSION  the sigs.k8s.io/krew module version (default below)
set -euo pipefail
VERSION=${KREW_VERSION:-v0.4.3}
exec bash "$(dirname "$0")/../go-tool.sh" krew sigs.k8s.io/krew/cmd/krew "$VERSION"
