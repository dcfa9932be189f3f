#!/usr/bin/env bash
# Builds the pinned upstream binaries the local control plane needs, from their Go modules,
# into a cache outside the repo keyed by version. Every step is skipped when its output exists,
# so a second run takes a second. Prints the bin directory on its last line.
#
#   build-binaries.sh            every binary below
#   build-binaries.sh NAME...    only those (a control plane needs no helm4; each Go build is minutes)
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  k8s.io/kubernetes $KUBE_VERSION
#   etcd                                                               go.etcd.io/etcd/server/v3 $ETCD_VERSION
#   kwok                                                               sigs.k8s.io/kwok $KWOK_VERSION
#   helm (3 and 4)                                                     helm.sh/helm/v3, helm.sh/helm/v4
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
CACHE=${UNWEDGE_CACHE:-$HOME/.cache/unwedge}
BIN=$CACHE/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION-$HELM4_VERSION
mkdir -p "$BIN" "$CACHE/gomod"
export GOFLAGS=-buildvcs=false
MOD=$(go env GOMODCACHE)
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
log() { echo "build-binaries: $*" >&2; }

ALL="kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm helm4"
WANT=" ${*:-$ALL} "
for b in $WANT; do
  case " $ALL " in
    *" $b "*) ;;
    *) echo "build-binaries: unknown binary '$b' (known: $ALL)" >&2; exit 2 ;;
  esac
done
# missing NAME...: succeeds when one of the named binaries is wanted and not built yet.
missing() {
  local b
  for b in "$@"; do
    case "$WANT" in *" $b "*) [ -x "$BIN/$b" ] || return 0 ;; esac
  done
  return 1
}
if ! missing $ALL; then echo "$BIN"; exit 0; fi

# Kubernetes: a module that requires k8s.io/kubernetes and replaces every staging module
# (`=> ./staging/...` in its go.mod) with the same path at v0.X.Y.
KUBE_BINS="kube-apiserver kube-controller-manager kube-scheduler kubectl"
K=$CACHE/gomod/k8s-$KUBE_VERSION
if missing $KUBE_BINS && [ ! -f "$K/tools.go" ]; then
  log "preparing the k8s.io/kubernetes $KUBE_VERSION module"
  mkdir -p "$K"
  ( cd "$K"
    rm -f go.mod go.sum
    go mod init unwedge.local/k8s >/dev/null 2>&1
    go mod edit -require=k8s.io/kubernetes@$KUBE_VERSION
    go mod download -json k8s.io/kubernetes@$KUBE_VERSION >/dev/null
    for m in $(grep -o 'k8s.io/[a-z0-9-]* => ./staging' "$MOD/cache/download/k8s.io/kubernetes/@v/$KUBE_VERSION.mod" | cut -d' ' -f1); do
      go mod edit -replace=$m=$m@v0${KUBE_VERSION#v1}
    done
    { printf '//go:build tools\npackage tools\nimport (\n'
      for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do echo "_ \"k8s.io/kubernetes/cmd/$c\""; done
      echo ')'; } > tools.go.tmp
    mv tools.go.tmp tools.go
    go mod tidy >/dev/null )
fi
LD="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
for c in $KUBE_BINS; do
  if missing "$c"; then
    log "go build $c"
    ( cd "$K" && CGO_ENABLED=0 go build -ldflags "$LD" -o "$BIN/$c.tmp" k8s.io/kubernetes/cmd/$c && mv "$BIN/$c.tmp" "$BIN/$c" )
  fi
done

# etcd: the server module with its sibling modules pinned to the same version.
if missing etcd; then
  log "go build etcd $ETCD_VERSION"
  E=$CACHE/gomod/etcd-$ETCD_VERSION
  mkdir -p "$E"
  ( cd "$E"
    if [ ! -f tools.go ]; then
      rm -f go.mod go.sum
      go mod init unwedge.local/etcd >/dev/null 2>&1
      go mod edit -require=go.etcd.io/etcd/server/v3@$ETCD_VERSION
      for m in api/v3 client/pkg/v3 client/v3 pkg/v3; do go mod edit -replace=go.etcd.io/etcd/$m=go.etcd.io/etcd/$m@$ETCD_VERSION; done
      printf '//go:build tools\npackage tools\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go.tmp
      mv tools.go.tmp tools.go
      go mod tidy >/dev/null
    fi
    CGO_ENABLED=0 go build -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 && mv "$BIN/etcd.tmp" "$BIN/etcd" )
fi

if missing kwok; then
  log "go install kwok $KWOK_VERSION"
  GOBIN=$BIN CGO_ENABLED=0 go install -ldflags "-s -w" sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION
fi
if missing helm; then
  log "go install helm $HELM_VERSION"
  GOBIN=$BIN CGO_ENABLED=0 go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm@$HELM_VERSION
fi
if missing helm4; then
  log "go install helm $HELM4_VERSION"
  T=$(mktemp -d)
  GOBIN=$T CGO_ENABLED=0 go install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM4_VERSION" helm.sh/helm/v4/cmd/helm@$HELM4_VERSION
  mv "$T/helm" "$BIN/helm4"; rmdir "$T"
fi
echo "$BIN"
