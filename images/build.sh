#!/usr/bin/env bash
# Builds unwedge's static musl binaries for linux/amd64 and linux/arm64 and its two images,
# FROM scratch, as OCI image layouts: no Docker daemon, nothing pulled.
#
#   images/build.sh [TAG]        (default TAG: dev) binaries + $OUT/oci/unwedge-{agent,operator}
#   images/build.sh --binaries   only the binaries (.ci/run builds them while Go builds)
#
#   UNWEDGE_ARCHES        the platforms, default "amd64 arm64" (UNWEDGE_ARCHES=amd64: one, faster)
#   UNWEDGE_IMAGE_ARCHES  the images' platforms, default UNWEDGE_ARCHES; on the others only the
#                         plugin is built (.ci/run: images amd64, the plugin on both; see there)
#   UNWEDGE_OUT           output directory, default $CARGO_TARGET_DIR/unwedge-release (or target/…)
#
# Binaries: unwedge-operator and kubectl-unwedge with cargo profile `dist` (Cargo.toml), in
# $CARGO_TARGET_DIR/<x86_64|aarch64>-unknown-linux-musl/dist/; unwedge-agent alone with profile
# `dist-agent` (built for size: its idle RSS is mostly its mapped executable), in
# .../dist-agent/. amd64 builds with musl-gcc;
# arm64 cross-compiles with cargo-zigbuild and zig (tools/zigbuild.sh: PyPI, cached). Each binary
# must be what `file` calls a statically linked (or static-pie) executable of its architecture (the line is
# printed), and each must answer --version: the host's natively, the other arch's under qemu-user
# when installed (required with UNWEDGE_QEMU=required, as in CI).
#
# Images: each layout holds one image index over the platforms; each platform's image is one
# gzip layer with the binary at /, and the config of images/<component>/config.json (user,
# entrypoint, labels). The agent runs as root: it writes sysfs (unbind, bind, reset) and may
# reboot the host (the chart makes it privileged with hostPID, never hostNetwork). The operator
# runs as user 65532 (the chart adds a read-only root filesystem and drops every capability).
# Layers, configs and manifests are written byte for byte the same from the same binaries (file
# times and `created` from SOURCE_DATE_EPOCH, default the commit's time), so one commit's
# binaries always give the same digests. The index digest is written to $OUT/oci/unwedge-<c>/digest;
# tools/release.sh pushes the layouts (crane) and prints the digests.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
tag=${1:-dev}
arches=${UNWEDGE_ARCHES:-amd64 arm64}
image_arches=${UNWEDGE_IMAGE_ARCHES:-$arches}
target_dir=${CARGO_TARGET_DIR:-$root/target}
out=${UNWEDGE_OUT:-$target_dir/unwedge-release}
profile=dist
log() { echo "images/build.sh: $*" >&2; }
die() { log "$*"; exit 1; }

triple() { case $1 in amd64) echo x86_64-unknown-linux-musl ;; arm64) echo aarch64-unknown-linux-musl ;; *) die "unknown arch $1 (amd64, arm64)" ;; esac; }
# What `file` says about a static executable of the arch.
file_arch() { case $1 in amd64) echo 'x86-64' ;; arm64) echo 'ARM aarch64' ;; esac; }
host_arch() { case $(uname -m) in x86_64) echo amd64 ;; aarch64) echo arm64 ;; *) uname -m ;; esac; }
# The cargo profile of a binary: the agent's is built for size (Cargo.toml).
profile_of() { if [ "$1" = unwedge-agent ]; then echo dist-agent; else echo "$profile"; fi; }
bin_path() { echo "$target_dir/$(triple "$1")/$(profile_of "$2")/$2"; }
# The binaries built for the arch: the plugin, and the images' two where the arch has images.
binaries() {
  echo kubectl-unwedge
  [[ " $image_arches " != *" $1 "* ]] || echo unwedge-agent unwedge-operator
}
for arch in $image_arches; do
  [[ " $arches " == *" $arch "* ]] || die "UNWEDGE_IMAGE_ARCHES ($image_arches) must be among UNWEDGE_ARCHES ($arches)"
done

ensure_target() {
  rustup target list --installed | grep -qx "$1" && return
  log "adding the rust target $1"
  rustup target add "$1"
}

# cargo_for ARCH PROFILE PACKAGE-ARGS...: one cargo build (zigbuild off amd64).
cargo_for() {
  local arch=$1 p=$2 t; t=$(triple "$arch"); shift 2
  if [ "$arch" = amd64 ]; then
    command -v musl-gcc >/dev/null 2>&1 || die "musl-gcc is missing: apt-get install musl-tools"
    log "cargo build --profile $p --target $t $*"
    ( cd "$root" && cargo build --profile "$p" --target "$t" "$@" )
  else
    local zb; zb=$(bash "$root/tools/zigbuild.sh")
    log "cargo zigbuild --profile $p --target $t $*"
    ( cd "$root" && PATH=$zb/bin:$PATH CARGO_ZIGBUILD_ZIG_PATH=$zb/ziglang/zig \
        cargo zigbuild --profile "$p" --target "$t" "$@" )
  fi
}

# The agent is built in a cargo run of its own: its profile differs, and its dependencies then
# carry only the features the agent uses.
build_arch() {
  local arch=$1 b packages=() agent=0
  for b in $(binaries "$arch"); do
    if [ "$b" = unwedge-agent ]; then agent=1; else packages+=(-p "$b"); fi
  done
  ensure_target "$(triple "$arch")"
  cargo_for "$arch" "$profile" "${packages[@]}"
  [ "$agent" = 0 ] || cargo_for "$arch" "$(profile_of unwedge-agent)" -p unwedge-agent --bin unwedge-agent
}

# Fails unless every binary of the arch is a static executable of that arch (prints `file`).
check_binaries() {
  local arch=$1 b desc status=0
  command -v file >/dev/null 2>&1 || die "file is missing: apt-get install file"
  for b in $(binaries "$arch"); do
    desc=$(file -b "$(bin_path "$arch" "$b")")
    log "file $(triple "$arch")/$(profile_of "$b")/$b: $desc"
    if [[ $desc != ELF*"$(file_arch "$arch")"*static*linked* ]]; then
      log "$b is not a static $(file_arch "$arch") executable"
      status=1
    fi
  done
  return $status
}

# How to run a binary of the arch here: nothing on the host's arch, qemu-user's qemu-<machine>
# (Debian's qemu-user) on another. Prints the command; fails when qemu is missing (then the
# binaries are identified by `file` only, said in the log; an error when UNWEDGE_QEMU=required, as
# in CI).
runner_of() {
  [ "$1" != "$(host_arch)" ] || return 0
  local q; q=qemu-$(case $1 in amd64) echo x86_64 ;; arm64) echo aarch64 ;; esac)
  command -v "$q" >/dev/null 2>&1 && { echo "$q"; return 0; }
  log "$q is missing (apt-get install qemu-user): the $1 binaries are identified, not run${UNWEDGE_QEMU:+ (UNWEDGE_QEMU=$UNWEDGE_QEMU)}"
  return 1
}
qemu_required() { [ "${UNWEDGE_QEMU:-}" = required ]; }

# Runs every binary of the arch with --version (another arch's under qemu): a binary that `file`
# identifies but that cannot start fails here.
run_binaries() {
  local arch=$1 b runner out status=0
  if ! runner=$(runner_of "$arch"); then ! qemu_required; return; fi
  for b in $(binaries "$arch"); do
    if out=$($runner "$(bin_path "$arch" "$b")" --version 2>&1) && [[ $out == *" $version" ]]; then
      log "ran $(triple "$arch")/$(profile_of "$b")/$b${runner:+ under $runner}: $out"
    else
      log "$(triple "$arch")/$(profile_of "$b")/$b --version${runner:+ under $runner} did not print its version $version: $out"
      status=1
    fi
  done
  return $status
}

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
for arch in $arches; do
  build_arch "$arch"
  check_binaries "$arch"
  run_binaries "$arch"
done
[ "$tag" != --binaries ] || exit 0

command -v jq >/dev/null 2>&1 || die "jq is missing: apt-get install jq"
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# put_blob LAYOUT FILE: stores FILE as a blob of LAYOUT; prints "<digest> <size>".
put_blob() {
  local hex size
  hex=$(sha256sum "$2" | cut -d' ' -f1)
  size=$(stat -c %s "$2")
  cp "$2" "$1/blobs/sha256/$hex"
  echo "sha256:$hex $size"
}
# descriptor MEDIATYPE "<digest> <size>" [PLATFORM-JSON]: an OCI descriptor.
descriptor() {
  local d s; read -r d s <<<"$2"
  jq -cn --arg m "$1" --arg d "$d" --argjson s "$s" --argjson p "${3:-null}" \
    '{mediaType: $m, digest: $d, size: $s} + (if $p then {platform: $p} else {} end)'
}

status=0
for component in agent operator; do
  binary=unwedge-$component
  layout=$out/oci/$binary
  rm -rf "$layout"
  mkdir -p "$layout/blobs/sha256"
  entries=()
  for arch in $image_arches; do
    w=$tmp/$component-$arch
    mkdir -p "$w/rootfs"
    install -m0755 "$(bin_path "$arch" "$binary")" "$w/rootfs/$binary"
    touch -d "@$epoch" "$w/rootfs/$binary"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --format=gnu \
      -C "$w/rootfs" -cf "$w/layer.tar" "$binary"
    gzip -n -9 <"$w/layer.tar" >"$w/layer.tar.gz"
    diff_id=sha256:$(sha256sum "$w/layer.tar" | cut -d' ' -f1)
    layer=$(put_blob "$layout" "$w/layer.tar.gz")
    jq -cj --arg arch "$arch" --arg created "$created" --arg diff "$diff_id" --arg v "$version" '
      {architecture: $arch, os: "linux", created: $created,
       config: (. | .Labels["org.opencontainers.image.version"] = $v),
       rootfs: {type: "layers", diff_ids: [$diff]},
       history: [{created: $created, created_by: "images/build.sh"}]}
      + (if $arch == "arm64" then {variant: "v8"} else {} end)' \
      "$here/$component/config.json" >"$w/config.json"
    config=$(put_blob "$layout" "$w/config.json")
    jq -cjn --argjson c "$(descriptor application/vnd.oci.image.config.v1+json "$config")" \
      --argjson l "$(descriptor application/vnd.oci.image.layer.v1.tar+gzip "$layer")" \
      '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json", config: $c, layers: [$l]}' \
      >"$w/manifest.json"
    platform=$(jq -cn --arg a "$arch" '{architecture: $a, os: "linux"} + (if $a == "arm64" then {variant: "v8"} else {} end)')
    entries+=("$(descriptor application/vnd.oci.image.manifest.v1+json "$(put_blob "$layout" "$w/manifest.json")" "$platform")")
    if runner=$(runner_of "$arch"); then
      # The image's own binary runs: extracted from the layer just written.
      mkdir -p "$w/x" && tar -xzf "$w/layer.tar.gz" -C "$w/x"
      if v=$($runner "$w/x/$binary" --version 2>&1); then log "$binary ($arch layer${runner:+, $runner}) --version: $v"; else log "$binary ($arch layer${runner:+, $runner}) --version FAILED: $v"; status=1; fi
    elif qemu_required; then
      status=1
    fi
  done
  printf '%s\n' "${entries[@]}" | jq -cjs '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: .}' >"$tmp/index.json"
  index=$(put_blob "$layout" "$tmp/index.json")
  jq -cn --argjson i "$(descriptor application/vnd.oci.image.index.v1+json "$index")" --arg tag "$tag" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [$i | .annotations = {"org.opencontainers.image.ref.name": $tag}]}' >"$layout/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  echo "${index%% *}" >"$layout/digest"
  log "$layout: $binary:$tag index ${index%% *} ($(du -sh "$layout/blobs" | cut -f1); platforms: $image_arches)"
done
exit $status
