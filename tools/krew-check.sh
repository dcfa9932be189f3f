#!/usr/bin/env bash
# Checks a krew manifest written by tools/release.sh against the archives it names: for each
# platform, the archive (the last path element of `uri`, looked up in DIR) exists, its sha256 is
# the one the manifest states, it holds exactly kubectl-unwedge and LICENSE, and its
# kubectl-unwedge is a static executable of the platform's arch (`file`). Prints one line per
# platform; exits 1 at the first mismatch.
#
#   tools/krew-check.sh MANIFEST DIR
set -euo pipefail
manifest=$1 dir=$2
fail() { echo "krew-check: $manifest: $*" >&2; exit 1; }

# "<os> <arch> <uri> <sha256>" per platform, in the order of the manifest.
platforms=$(awk '
  /^ *- selector:/ { if (os != "") print os, arch, uri, sha; os = arch = uri = sha = "" }
  /^ +os: /     { os = $2 }
  /^ +arch: /   { arch = $2 }
  /^ +uri: /    { uri = $2 }
  /^ +sha256: / { sha = $2 }
  END { if (os != "") print os, arch, uri, sha }' "$manifest")
[ -n "$platforms" ] || fail "no platforms"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
while read -r os arch uri sha; do
  archive=$dir/${uri##*/}
  [ -f "$archive" ] || fail "$os/$arch: $archive is missing"
  actual=$(sha256sum "$archive" | cut -d' ' -f1)
  [ "$actual" = "$sha" ] || fail "$os/$arch: the manifest says sha256 $sha, ${archive##*/} has $actual"
  files=$(tar -tzf "$archive" | sort | paste -sd' ')
  [ "$files" = "LICENSE kubectl-unwedge" ] || fail "$os/$arch: ${archive##*/} holds '$files', not LICENSE and kubectl-unwedge"
  rm -rf "$tmp/x" && mkdir "$tmp/x" && tar -xzf "$archive" -C "$tmp/x"
  case $arch in amd64) want='x86-64' ;; arm64) want='ARM aarch64' ;; *) fail "unknown arch $arch" ;; esac
  desc=$(file -b "$tmp/x/kubectl-unwedge")
  [[ $desc == ELF*"$want"*static*linked* ]] || fail "$os/$arch: kubectl-unwedge is '$desc'"
  echo "krew-check: $os/$arch ${archive##*/} sha256 $sha: ok ($desc)"
done <<<"$platforms"
