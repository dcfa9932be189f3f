#!/usr/bin/env bash
# Builds helm-docs (the chart README's values table, generated from values.yaml's `# --`
# comments; tools/go-tool.sh: cached by version) and prints its path on the last line.
#
#   HELM_DOCS_VERSION  the github.com/norwoodj/helm-docs module version (default below)
set -euo pipefail
VERSION=${HELM_DOCS_VERSION:-v1.14.2}
exec bash "$(dirname "$0")/../go-tool.sh" helm-docs \
  github.com/norwoodj/helm-docs/cmd/helm-docs "$VERSION"
