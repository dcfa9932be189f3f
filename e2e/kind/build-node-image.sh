#!/usr/bin/env bash
# Builds the kind node image local/kind-node:$KUBE_VERSION with no container registry: every
# binary from the Go module proxy (or gcc), the root filesystem from Debian's packages
# (debootstrap'd bookworm), every image tagged with the exact name that kind and kubeadm look for,
# preloaded into the node's containerd. `kind build node-image` cannot do this offline: it always
# pulls its base image.
#
# Needs root, Go >= 1.26, and Debian packages docker.io debootstrap libseccomp-dev
# containernetworking-plugins jq gcc libc6-dev. Starts dockerd when `docker info` fails.
# Everything is cached under ~/.cache/unwedge/kind-<versions> (see lib.sh); each step is skipped
# when its output exists, and the Go build cache is the one the local control plane uses.
# Also builds the kind binary ($KIND_WORK/bin/kind). Prints timing lines per step.
#
#   e2e/kind/build-node-image.sh            # build (or confirm) the node image
#   KIND_ONLY=1 e2e/kind/build-node-image.sh  # only the kind binary (stock node image users)
set -euo pipefail
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
export GOFLAGS=-buildvcs=false
MOD=$(go env GOMODCACHE)
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
W=$KIND_WORK
mkdir -p "$W"/{bin,k8s/bin,rt/bin,img}
cd "$W"

if [ ! -x bin/kind ]; then
  log "go install sigs.k8s.io/kind@$KIND_VERSION"
  GOBIN=$W/bin CGO_ENABLED=0 go install sigs.k8s.io/kind@$KIND_VERSION
fi
lap "kind binary"
[ "${KIND_ONLY:-}" = 1 ] && exit 0

ensure_docker
lap "docker daemon"
if docker image inspect "$LOCAL_NODE_IMAGE" >/dev/null 2>&1 && [ -f node-image.done ]; then
  log "$LOCAL_NODE_IMAGE exists"
  exit 0
fi
for b in debootstrap jq gcc; do command -v $b >/dev/null || die "$b missing: apt-get install -y docker.io debootstrap libseccomp-dev containernetworking-plugins jq gcc libc6-dev"; done
[ -f /usr/include/seccomp.h ] || die "libseccomp-dev missing (runc is built with seccomp)"
[ -x /usr/lib/cni/bridge ] || die "containernetworking-plugins missing (/usr/lib/cni/bridge)"

go mod download sigs.k8s.io/kind@$KIND_VERSION
KINDSRC=$MOD/sigs.k8s.io/kind@$KIND_VERSION

# The root filesystem in the background while Go builds.
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
if [ ! -f rootfs.done ]; then
  log "debootstrap bookworm from $mirror (background, log $W/debootstrap.log)"
  ( rm -rf rootfs && debootstrap --variant=minbase \
      --include=systemd,systemd-sysv,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,fuse-overlayfs,bash,ca-certificates,curl,jq,procps,e2fsprogs,socat \
      bookworm rootfs "$mirror" > debootstrap.log 2>&1 && touch rootfs.done ) &
  debootstrap_pid=$!
fi

# Control-plane binaries (kube-apiserver, -controller-manager, -scheduler, kubectl, etcd) are
# the local control plane's, built by e2e/cluster/build-binaries.sh with the same flags.
"$E2E_DIR/cluster/build-binaries.sh" kube-apiserver kube-controller-manager kube-scheduler kubectl etcd >/dev/null
lap "control plane binaries"

# kubelet, kubeadm, kube-proxy: a sibling of build-binaries' module (same go.mod and replaces,
# so the same dependency versions and the same Go build cache entries), tidied for these commands.
K=$CACHE/gomod/k8s-node-$KUBE_VERSION
CPK=$CACHE/gomod/k8s-$KUBE_VERSION
if [ ! -f "$K/tools.go" ]; then
  log "preparing the node module $K"
  mkdir -p "$K"
  cp "$CPK/go.mod" "$CPK/go.sum" "$K/"
  ( cd "$K"
    sed -i 's#^module .*#module unwedge.local/k8snode#' go.mod
    { printf '//go:build tools\npackage tools\nimport (\n'
      for c in kubelet kubeadm kube-proxy; do echo "_ \"k8s.io/kubernetes/cmd/$c\""; done
      echo ')'; } > tools.go.tmp
    mv tools.go.tmp tools.go
    go mod tidy >/dev/null )
fi
LD="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
for c in kubelet kubeadm kube-proxy; do
  if [ ! -x "k8s/bin/$c" ]; then
    log "go build $c"
    ( cd "$K" && CGO_ENABLED=0 go build -ldflags "$LD" -o "$W/k8s/bin/$c.tmp" k8s.io/kubernetes/cmd/$c )
    mv "k8s/bin/$c.tmp" "k8s/bin/$c"
  fi
done
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do cp -u "$CP_BIN/$c" k8s/bin/; done
lap "kubelet kubeadm kube-proxy"

if [ ! -x rt/bin/containerd ]; then
  log "go install containerd $CONTAINERD_VERSION"
  GOBIN=$W/rt/bin CGO_ENABLED=0 go install -tags "no_aufs no_zfs no_btrfs no_devmapper" \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION \
    github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION
fi
if [ ! -x rt/bin/runc ]; then
  log "go install runc $RUNC_VERSION"
  GOBIN=$W/rt/bin CGO_ENABLED=1 go install -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v}" github.com/opencontainers/runc@$RUNC_VERSION
fi
if [ ! -x rt/bin/crictl ]; then
  log "go install crictl $CRICTL_VERSION"
  GOBIN=$W/rt/bin CGO_ENABLED=0 go install -ldflags "-s -w" sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION
fi
lap "containerd runc crictl"

for d in kube etcd pause coredns kube-proxy; do mkdir -p img/$d; cp "$KIND_DIR/images/$d/Dockerfile" img/$d/; done
if [ ! -x img/coredns/coredns ]; then
  log "go install coredns $COREDNS_VERSION"
  GOBIN=$W/img/coredns CGO_ENABLED=0 go install -ldflags "-s -w" github.com/coredns/coredns@$COREDNS_VERSION
fi
cp -u "$CP_BIN/etcd" img/etcd/etcd   # static (CGO_ENABLED=0): the image is FROM scratch
if [ ! -x img/pause/pause ]; then
  go mod download k8s.io/kubernetes@$KUBE_VERSION
  gcc -Os -static -DVERSION=$PAUSE_VERSION -o img/pause/pause.tmp "$MOD/k8s.io/kubernetes@$KUBE_VERSION/build/pause/linux/pause.c"
  strip img/pause/pause.tmp && mv img/pause/pause.tmp img/pause/pause
fi
lap "coredns etcd pause payloads"

[ -z "${debootstrap_pid:-}" ] || wait "$debootstrap_pid" || true
[ -f rootfs.done ] || die "debootstrap failed: see $W/debootstrap.log"
lap "debootstrap (waited)"

if [ ! -f rootfs.prepared ]; then
  log "preparing the base root filesystem as kind's images/base does"
  chroot rootfs apt-get clean; rm -rf rootfs/var/lib/apt/lists/*
  tar -C rootfs -c . | docker import - local/debian:bookworm >/dev/null
  F=$KINDSRC/images/base/files; R=rootfs
  install -m0755 "$F"/usr/local/bin/* $R/usr/local/bin/
  mkdir -p $R/kind/bin $R/etc/containerd $R/etc/default $R/etc/sysctl.d $R/etc/systemd/system/kubelet.service.d
  install -m0644 "$F/kind/README.txt" $R/kind/; install -m0755 "$F"/kind/bin/* $R/kind/bin/
  install -m0644 "$F/etc/crictl.yaml" $R/etc/; install -m0644 "$F/etc/containerd/config.toml" $R/etc/containerd/
  install -m0644 "$F/etc/default/kubelet" $R/etc/default/; install -m0644 "$F"/etc/sysctl.d/* $R/etc/sysctl.d/
  install -m0644 "$F"/etc/systemd/system/*.service "$F/etc/systemd/system/kubelet.slice" $R/etc/systemd/system/
  install -m0644 "$F"/etc/systemd/system/kubelet.service.d/* $R/etc/systemd/system/kubelet.service.d/
  chroot $R /bin/bash -ec '
    find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete
    rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
          /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
          /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/*
    echo ReadKMsg=no >> /etc/systemd/journald.conf
    systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
    systemctl mask systemd-binfmt.service >/dev/null 2>&1
    mkdir -p /etc/kubernetes/manifests /opt/cni/bin /etc/cni/net.d'
  touch rootfs.prepared
fi
docker image inspect local/debian:bookworm >/dev/null 2>&1 || tar -C rootfs -c . | docker import - local/debian:bookworm >/dev/null
lap "base root filesystem"

KB=$W/k8s/bin
b() { DOCKER_BUILDKIT=0 docker build -q "$@" >/dev/null; }
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  cp -u $KB/$c img/kube/$c
  b --build-arg BIN=$c -t registry.k8s.io/$c:$KUBE_VERSION img/kube
done
cp -u $KB/kube-proxy img/kube-proxy/
b -t registry.k8s.io/kube-proxy:$KUBE_VERSION img/kube-proxy
b -t registry.k8s.io/etcd:$KUBEADM_ETCD_TAG img/etcd
docker tag registry.k8s.io/etcd:$KUBEADM_ETCD_TAG registry.k8s.io/etcd:${ETCD_VERSION#v}-0
b -t registry.k8s.io/pause:$PAUSE_VERSION img/pause
docker tag registry.k8s.io/pause:$PAUSE_VERSION registry.k8s.io/pause:3.10   # kind's containerd config
b -t registry.k8s.io/coredns/coredns:$COREDNS_VERSION img/coredns
lap "component images"

R=$W/rootfs-node
rm -rf "$R"; cp -a rootfs "$R"
install -m0755 rt/bin/containerd rt/bin/ctr rt/bin/containerd-shim-runc-v2 rt/bin/crictl "$R/usr/local/bin/"
install -m0755 rt/bin/runc "$R/usr/local/sbin/runc"
for p in host-local loopback ptp portmap bridge; do install -m0755 /usr/lib/cni/$p "$R/opt/cni/bin/"; done
rt/bin/ctr oci spec \
  | jq '.hooks.createContainer[.hooks.createContainer|length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
  | jq 'del(.process.rlimits)' > "$R/etc/containerd/cri-base.json"
for c in kubeadm kubelet kubectl; do install -m0755 $KB/$c "$R/usr/bin/$c"; done
mkdir -p "$R/kind/manifests"
echo -n "$KUBE_VERSION" > "$R/kind/version"
cp "$KIND_DIR/files/default-cni.yaml" "$R/kind/manifests/default-cni.yaml"
cp "$KIND_DIR/files/10-bridge.conflist" "$R/etc/cni/net.d/"
install -m0755 "$KIND_DIR/files/node-pre" "$R/usr/local/bin/node-pre"
# Without CAP_SYS_RESOURCE containerd may not lower oom_score_adj below its own; harmless elsewhere.
sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$R/etc/containerd/config.toml"
lap "node root filesystem"

ENTRY='ENTRYPOINT [ "/usr/local/bin/node-pre", "/usr/local/bin/entrypoint", "/sbin/init" ]'
tar -C "$R" -c . | docker import --change 'ENV container=docker' --change "$ENTRY" - local/kind-node-raw:$KUBE_VERSION >/dev/null
printf 'FROM local/kind-node-raw:%s\nSTOPSIGNAL SIGRTMIN+3\n' $KUBE_VERSION | DOCKER_BUILDKIT=0 docker build -q -t local/kind-node-base:$KUBE_VERSION - >/dev/null
IMAGES="registry.k8s.io/kube-apiserver:$KUBE_VERSION registry.k8s.io/kube-controller-manager:$KUBE_VERSION registry.k8s.io/kube-scheduler:$KUBE_VERSION registry.k8s.io/kube-proxy:$KUBE_VERSION registry.k8s.io/etcd:$KUBEADM_ETCD_TAG registry.k8s.io/etcd:${ETCD_VERSION#v}-0 registry.k8s.io/coredns/coredns:$COREDNS_VERSION registry.k8s.io/pause:$PAUSE_VERSION registry.k8s.io/pause:3.10"
id=unwedge-kind-build-$$
docker run -d --name $id --entrypoint=sleep --security-opt seccomp=unconfined local/kind-node-base:$KUBE_VERSION infinity >/dev/null
trap 'docker rm -f -v $id >/dev/null 2>&1 || true' EXIT
docker exec $id bash -c 'nohup containerd > /var/log/containerd-preload.log 2>&1 &'
for _ in $(seq 1 30); do docker exec $id ctr info >/dev/null 2>&1 && break; sleep 1; done
docker save $IMAGES | docker exec -i $id ctr --namespace=k8s.io images import \
  --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests - >/dev/null
docker exec $id pkill containerd || true
sleep 2
docker commit --change "$ENTRY" $id "$LOCAL_NODE_IMAGE" >/dev/null
rm -rf "$R"   # 1 GB; rebuilt from rootfs in seconds
touch node-image.done
lap "node image (preload, commit)"
log "done: $LOCAL_NODE_IMAGE ($(docker image inspect -f '{{.Size}}' "$LOCAL_NODE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
