#!/usr/bin/env bash
# Checks in seconds that this machine can run `make demo` or `make test`, before any build, and
# says exactly what to install when it cannot. As root on Debian or Ubuntu it installs the
# missing Debian packages itself (apt-get), saying so; Go and rustup it never installs.
#
#   tools/prereqs.sh demo   Go >= 1.26, rustup, a C toolchain, openssl, root
#   tools/prereqs.sh test   the same, and every tool `make test` uses (.ci/run's apt list)
#
#   UNWEDGE_PREREQS_INSTALL=0   only report (.ci/run: its own apt list must be complete)
set -euo pipefail
GO_MIN_MINOR=26

# "<Debian package> <a command, or an absolute path, it provides>", one a line.
DEMO_PACKAGES="
ca-certificates /etc/ssl/certs/ca-certificates.crt
gcc cc
libc6-dev /usr/include/stdlib.h
make make
openssl openssl
"
TEST_PACKAGES="
git git
curl curl
jq jq
bc bc
pkg-config pkg-config
musl-tools musl-gcc
iproute2 ip
util-linux nsenter
docker.io dockerd
debootstrap debootstrap
libseccomp-dev /usr/include/seccomp.h
containernetworking-plugins /usr/lib/cni/bridge
file file
python3-pip pip3
qemu-user qemu-aarch64
"

problems=()
packages=()

# present THING: an absolute path that exists, or a command on PATH or in /usr/sbin, /sbin
# (where dockerd and debootstrap are, off a normal user's PATH).
present() {
  case $1 in
    /*) [ -e "$1" ] ;;
    *) PATH=$PATH:/usr/sbin:/sbin command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# Adds to `packages` each package of the list ("<package> <thing>" lines) whose thing is absent.
missing_packages() {
  local pkg thing
  while read -r pkg thing; do
    [ -n "$pkg" ] || continue
    present "$thing" || packages+=("$pkg")
  done <<<"$1"
}

check_go() {
  local hint="install Go >= 1.$GO_MIN_MINOR from https://go.dev/dl/ (Debian's golang is older)"
  if ! command -v go >/dev/null 2>&1; then
    if [ -x /usr/local/go/bin/go ]; then hint="put /usr/local/go/bin on PATH"; fi
    problems+=("go is not on PATH: $hint")
    return
  fi
  local v; v=$(go env GOVERSION); v=${v#go}
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  if (( major < 1 || (major == 1 && minor < GO_MIN_MINOR) )); then
    problems+=("go $v is too old: $hint")
  fi
}

check_rustup() {
  command -v rustup >/dev/null 2>&1 && return
  if [ -x "$HOME/.cargo/bin/rustup" ]; then
    problems+=("rustup is not on PATH: put \$HOME/.cargo/bin on PATH")
  else
    problems+=("rustup is missing: install it from https://rustup.rs (rust-toolchain.toml picks the toolchain)")
  fi
}

check_root() {
  [ "$(id -u)" = 0 ] && return
  problems+=("$1 must run as root: $2")
}

debian_like() {
  [ -r /etc/os-release ] && grep -Eq '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release &&
    command -v apt-get >/dev/null 2>&1
}

# Installs `packages` when allowed and possible; otherwise turns them into one problem.
install_packages() {
  [ ${#packages[@]} -gt 0 ] || return 0
  if [ "${UNWEDGE_PREREQS_INSTALL:-1}" != 0 ] && [ "$(id -u)" = 0 ] && debian_like; then
    echo "prereqs: installing the missing Debian packages: ${packages[*]} (apt-get, as root)" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >&2
    return
  fi
  problems+=("missing Debian packages; install them with: apt-get install -y ${packages[*]}")
}

main() {
  local target=${1:-}
  case $target in
    demo)
      missing_packages "$DEMO_PACKAGES"
      check_root "make demo" "it injects uevents through the kernel in network namespaces" ;;
    test)
      missing_packages "$DEMO_PACKAGES"
      missing_packages "$TEST_PACKAGES"
      check_root "make test" "network namespaces, the kernel uevent tests, dockerd, debootstrap" ;;
    *) echo "usage: tools/prereqs.sh demo|test" >&2; exit 2 ;;
  esac
  check_go
  check_rustup
  install_packages
  if [ ${#problems[@]} -gt 0 ]; then
    echo "prereqs: this machine cannot run \`make $target\` yet:" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 1
  fi
  echo "prereqs: ok for make $target" >&2
}

main "$@"
