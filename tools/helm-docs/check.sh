#!/usr/bin/env bash
# The chart README is generated: charts/unwedge/README.md.gotmpl plus the values table that
# helm-docs reads from values.yaml. `check.sh` fails when the committed README differs from what
# helm-docs generates now; `check.sh --write` regenerates it.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(bash tools/helm-docs/build.sh | tail -n 1)
chart=charts/unwedge
if [ "${1:-}" = --write ]; then
  "$bin" --chart-search-root "$chart" --template-files README.md.gotmpl --output-file README.md
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$chart" "$tmp/"
"$bin" --chart-search-root "$tmp/unwedge" --template-files README.md.gotmpl --output-file README.md >/dev/null
if ! diff -u "$chart/README.md" "$tmp/unwedge/README.md"; then
  echo "charts/unwedge/README.md is stale: run tools/helm-docs/check.sh --write and commit it" >&2
  exit 1
fi
echo "charts/unwedge/README.md is current (helm-docs)"
