# Shared settings and helpers for the kind scripts; sourced, never run.
# Pinned versions: Kubernetes and etcd from e2e/cluster/versions.env (shared with the local
# control plane), the node's runtime below. The cache directory name carries every version, so
# a version bump builds into a fresh directory and never mixes binaries.
KIND_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
E2E_DIR=$(dirname "$KIND_DIR")
. "$E2E_DIR/cluster/versions.env"
KIND_VERSION=${KIND_VERSION:-v0.33.0}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.3.4}  # kubelet 1.37 wants containerd 2.x
RUNC_VERSION=${RUNC_VERSION:-v1.4.3}
CRICTL_VERSION=${CRICTL_VERSION:-v1.36.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.6}       # what kubeadm 1.37.2 asks for
PAUSE_VERSION=${PAUSE_VERSION:-3.10.2}
KUBEADM_ETCD_TAG=${KUBEADM_ETCD_TAG:-3.7.0-0}     # the etcd tag kubeadm 1.37.2 asks for
CACHE=${UNWEDGE_CACHE:-$HOME/.cache/unwedge}
KIND_WORK=$CACHE/kind-$KUBE_VERSION-kind-$KIND_VERSION-containerd-$CONTAINERD_VERSION-runc-$RUNC_VERSION-crictl-$CRICTL_VERSION-coredns-$COREDNS_VERSION-etcd-$ETCD_VERSION
# The control plane's bin directory, laid out by e2e/cluster/build-binaries.sh.
CP_BIN=$CACHE/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION-$HELM4_VERSION
LOCAL_NODE_IMAGE=local/kind-node:$KUBE_VERSION
CLUSTER_NAME=${CLUSTER_NAME:-unwedge}
PLUGIN_IMAGE=${PLUGIN_IMAGE:-unwedge/fake-device-plugin:dev}
# Host path (inside the node) of the fake sysfs tree, the fake /dev and the write journal.
FAKE_ROOT=/var/lib/unwedge-fake

_t_start=$(date +%s.%N)
_t_lap=$_t_start
# Prints "timing: <step> <seconds since last lap>s (total <seconds>s)".
lap() {
  local now; now=$(date +%s.%N)
  awk -v s="$1" -v a="$_t_lap" -v b="$now" -v t="$_t_start" \
    'BEGIN { printf "timing: %-28s %7.1fs (total %.1fs)\n", s, b - a, b - t }'
  _t_lap=$now
}

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# Starts the Docker daemon in the background when `docker info` fails (Debian's docker.io).
ensure_docker() {
  docker info >/dev/null 2>&1 && return 0
  command -v dockerd >/dev/null || die "no Docker daemon answers and dockerd is not installed (apt-get install docker.io)"
  log "starting dockerd (log: /var/log/unwedge-dockerd.log)"
  setsid nohup dockerd >/var/log/unwedge-dockerd.log 2>&1 </dev/null &
  local i
  for i in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  die "dockerd did not answer within 60s: see /var/log/unwedge-dockerd.log"
}

# True when the capability bounding set lacks CAP_SYS_RESOURCE (bit 24): there
# `docker run --privileged` fails and kind needs the bin/docker shim.
needs_privileged_shim() {
  local capbnd
  capbnd=$(awk '/^CapBnd/{print $2}' /proc/self/status)
  (( (16#$capbnd >> 24 & 1) == 0 ))
}

# Puts the kind binary on PATH (and the shim before docker, where needed).
kind_path() {
  case ":$PATH:" in *":$KIND_WORK/bin:"*) ;; *) export PATH=$KIND_WORK/bin:$CP_BIN:$PATH ;; esac
  if needs_privileged_shim; then
    # The shim finds the real docker itself (the first one on PATH that is not the shim).
    case ":$PATH:" in *":$KIND_DIR/bin:"*) ;; *) export PATH=$KIND_DIR/bin:$PATH ;; esac
  fi
}

# The kind node container's name.
node_container() { echo "$CLUSTER_NAME-control-plane"; }
