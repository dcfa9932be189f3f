#!/usr/bin/env bash
# `make release`: unwedge for linux/amd64 and linux/arm64 — the images, the chart, the kubectl
# plugin's archives and its krew manifest — pushed to an OCI registry when one is given, with
# the digests printed. No Docker daemon: images/build.sh writes OCI layouts, crane pushes them,
# helm pushes the chart.
#
#   tools/release.sh [--registry HOST[:PORT][/PATH]] [--plain-http] [--download-url URL]
#
#   --registry      push the images to REGISTRY/unwedge/{agent,operator}:<appVersion> and the chart
#                   to oci://REGISTRY/charts/unwedge:<version> (log in first: `crane auth login`,
#                   `helm registry login`); without it nothing is pushed
#   --plain-http    the registry speaks plain HTTP (a local or test registry)
#   --download-url  where the plugin archives will be published, for the krew manifest's URIs
#                   (default: the GitHub release v<appVersion> of Chart.yaml's `home`)
#   UNWEDGE_ARCHES, UNWEDGE_IMAGE_ARCHES, UNWEDGE_OUT: the platforms and output directory
#                   (images/build.sh; default: everything for linux/amd64 and linux/arm64)
#
# Versions: the chart's `version` and `appVersion` (charts/unwedge/Chart.yaml); appVersion must
# be the workspace's version (what the binaries report) and is the image tag.
# Output in $UNWEDGE_OUT (default $CARGO_TARGET_DIR/unwedge-release):
#   oci/unwedge-{agent,operator}/             the images (OCI layouts, one index over the platforms)
#   kubectl-unwedge_v<V>_linux_<arch>.tar.gz  the plugin: kubectl-unwedge and LICENSE
#   krew/unwedge.yaml                         its krew manifest (checked: tools/krew-check.sh)
#   unwedge-<chart version>.tgz               the packaged chart
#   release.env                               VERSION, CHART_VERSION, REGISTRY and the digests,
#                                             for scripts (the kind tier installs from it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
registry="" plain_http="" download_url=""
while [ $# -gt 0 ]; do
  case $1 in
    --registry) registry=${2%/}; shift 2 ;;
    --plain-http) plain_http=1; shift ;;
    --download-url) download_url=${2%/}; shift 2 ;;
    *) echo "usage: tools/release.sh [--registry HOST[:PORT][/PATH]] [--plain-http] [--download-url URL]" >&2; exit 2 ;;
  esac
done
log() { echo "release: $*" >&2; }
die() { log "$*"; exit 1; }
arches=${UNWEDGE_ARCHES:-amd64 arm64}
image_arches=${UNWEDGE_IMAGE_ARCHES:-$arches}
export UNWEDGE_ARCHES=$arches UNWEDGE_IMAGE_ARCHES=$image_arches
out=${UNWEDGE_OUT:-${CARGO_TARGET_DIR:-$root/target}/unwedge-release}
export UNWEDGE_OUT=$out
chart_yaml=$root/charts/unwedge/Chart.yaml
chart_version=$(sed -n 's/^version: *//p' "$chart_yaml")
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' "$chart_yaml")
workspace_version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
[ "$version" = "$workspace_version" ] || die "Chart.yaml appVersion $version is not the workspace version $workspace_version (Cargo.toml)"
home=$(sed -n 's/^home: *//p' "$chart_yaml")
download_url=${download_url:-$home/releases/download/v$version}
t0=$SECONDS
lap() { log "timing: $1 $((SECONDS - t0))s"; t0=$SECONDS; }

bash "$root/images/build.sh" "$version"
lap "binaries and images (images: $image_arches; plugin: $arches)"

# The plugin's archives: the same bytes from the same binary (sorted names, fixed owner and times).
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}
target_dir=${CARGO_TARGET_DIR:-$root/target}
rm -f "$out"/kubectl-unwedge_*.tar.gz
declare -A archive_sha=()
for arch in $arches; do
  case $arch in amd64) t=x86_64-unknown-linux-musl ;; arm64) t=aarch64-unknown-linux-musl ;; esac
  stage=$(mktemp -d)
  install -m0755 "$target_dir/$t/dist/kubectl-unwedge" "$stage/kubectl-unwedge"
  install -m0644 "$root/LICENSE" "$stage/LICENSE"
  touch -d "@$epoch" "$stage"/*
  name=kubectl-unwedge_v${version}_linux_$arch.tar.gz
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --format=gnu \
    -C "$stage" -c kubectl-unwedge LICENSE | gzip -n -9 >"$out/$name"
  rm -rf "$stage"
  archive_sha[$arch]=$(sha256sum "$out/$name" | cut -d' ' -f1)
done

mkdir -p "$out/krew"
{
  cat <<EOF
apiVersion: krew.googlecontainertools.github.com/v1alpha2
kind: Plugin
metadata:
  name: unwedge
spec:
  version: v$version
  homepage: $home
  shortDescription: Approve and inspect GPU recoveries by unwedge
  description: |
    Lists, describes, approves, retries and abandons the GpuWedges of unwedge (GPUs that their
    driver reported wedged, and their recovery), shows the recovery budgets, and pauses or
    resumes a RecoveryPolicy. Needs unwedge's CRDs in the cluster.
  platforms:
EOF
  for arch in $arches; do
    cat <<EOF
  - selector:
      matchLabels:
        os: linux
        arch: $arch
    uri: $download_url/kubectl-unwedge_v${version}_linux_$arch.tar.gz
    sha256: ${archive_sha[$arch]}
    bin: kubectl-unwedge
    files:
    - from: kubectl-unwedge
      to: .
    - from: LICENSE
      to: .
EOF
  done
} >"$out/krew/unwedge.yaml"
bash "$root/tools/krew-check.sh" "$out/krew/unwedge.yaml" "$out" >&2
lap "plugin archives and krew manifest"

helm=$(bash "$root/e2e/cluster/build-binaries.sh" helm | tail -1)/helm
rm -f "$out"/unwedge-*.tgz
"$helm" package "$root/charts/unwedge" --destination "$out" >/dev/null
chart=$out/unwedge-$chart_version.tgz
[ -f "$chart" ] || die "helm package wrote no $chart"
lap "chart package"

agent_digest=$(cat "$out/oci/unwedge-agent/digest")
operator_digest=$(cat "$out/oci/unwedge-operator/digest")
chart_digest=""
if [ -n "$registry" ]; then
  crane=$(bash "$root/tools/crane/build.sh" | tail -1)
  for component in agent operator; do
    ref=$registry/unwedge/$component:$version
    want=$(cat "$out/oci/unwedge-$component/digest")
    log "crane push oci/unwedge-$component $ref"
    "$crane" push ${plain_http:+--insecure} "$out/oci/unwedge-$component" "$ref" >/dev/null
    got=$("$crane" digest ${plain_http:+--insecure} "$ref")
    [ "$got" = "$want" ] || die "$ref has digest $got after the push, the layout's index is $want"
    for arch in $image_arches; do
      "$crane" manifest ${plain_http:+--insecure} --platform "linux/$arch" "$ref" >/dev/null \
        || die "$ref has no linux/$arch image"
    done
  done
  log "helm push $(basename "$chart") oci://$registry/charts"
  pushed=$("$helm" push "$chart" "oci://$registry/charts" ${plain_http:+--plain-http} 2>&1) || die "helm push failed: $pushed"
  chart_digest=$(sed -n 's/^Digest: *//p' <<<"$pushed")
  [ -n "$chart_digest" ] || die "helm push printed no digest: $pushed"
  lap "push"
fi

cat >"$out/release.env" <<EOF
VERSION=$version
CHART_VERSION=$chart_version
REGISTRY=$registry
AGENT_DIGEST=$agent_digest
OPERATOR_DIGEST=$operator_digest
CHART_DIGEST=$chart_digest
EOF
echo "unwedge $version (chart $chart_version; images linux/${image_arches// /, linux/}; plugin linux/${arches// /, linux/}) in $out:"
if [ -n "$registry" ]; then
  echo "  $registry/unwedge/agent:$version@$agent_digest"
  echo "  $registry/unwedge/operator:$version@$operator_digest"
  echo "  oci://$registry/charts/unwedge:$chart_version@$chart_digest"
  echo "install:"
  echo "  helm install unwedge oci://$registry/charts/unwedge --version $chart_version --namespace unwedge-system \\"
  echo "    --set global.imageRegistry=$registry \\"
  echo "    --set agent.image.digest=$agent_digest --set operator.image.digest=$operator_digest"
else
  echo "  oci/unwedge-agent     index $agent_digest"
  echo "  oci/unwedge-operator  index $operator_digest"
  echo "  $(basename "$chart")  (not pushed: no --registry)"
fi
for arch in $arches; do
  echo "  kubectl-unwedge_v${version}_linux_$arch.tar.gz  sha256 ${archive_sha[$arch]}"
done
echo "  krew/unwedge.yaml"
