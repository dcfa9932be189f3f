#!/usr/bin/env bash
# Installs cargo-zigbuild and zig (both from PyPI: prebuilt, pinned) into a cache outside the
# repo, keyed by their versions, and prints the directory on its last line: put DIR/bin on PATH
# and set CARGO_ZIGBUILD_ZIG_PATH=DIR/ziglang/zig. A second run only prints the directory.
# They cross-compile the static aarch64 musl binaries (zig is the C compiler for ring and the
# linker, with its own musl); x86_64 builds use musl-gcc and need neither.
#
#   tools/zigbuild.sh
#   UNWEDGE_CACHE  cache root (default ~/.cache/unwedge); installs into bin/zigbuild-<v>-zig-<v>
set -euo pipefail
ZIGBUILD_VERSION=0.24.1
ZIG_VERSION=0.17.1
cache=${UNWEDGE_CACHE:-$HOME/.cache/unwedge}
dir=$cache/bin/zigbuild-$ZIGBUILD_VERSION-zig-$ZIG_VERSION
if [ -x "$dir/bin/cargo-zigbuild" ] && [ -x "$dir/ziglang/zig" ]; then echo "$dir"; exit 0; fi
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [ ! -x "$dir/bin/cargo-zigbuild" ] || [ ! -x "$dir/ziglang/zig" ]; then
  python3 -m pip --version >/dev/null 2>&1 || { echo "zigbuild: pip is missing: apt-get install python3-pip" >&2; exit 1; }
  echo "zigbuild: pip install cargo-zigbuild==$ZIGBUILD_VERSION ziglang==$ZIG_VERSION" >&2
  rm -rf "$dir.tmp"
  # --target: a directory of its own, outside any Python environment (no system packages touched).
  python3 -m pip install --quiet --root-user-action=ignore --disable-pip-version-check --no-warn-script-location \
    --target "$dir.tmp" "cargo-zigbuild==$ZIGBUILD_VERSION" "ziglang==$ZIG_VERSION" >&2
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
fi
echo "$dir"
