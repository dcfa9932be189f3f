#!/usr/bin/env bash
# The unwedge kind cluster (one node, named $CLUSTER_NAME, default "unwedge").
#
#   e2e/kind/cluster.sh create            # build/confirm the offline node image, create the cluster
#   e2e/kind/cluster.sh load IMAGE...     # kind load docker-image into the node
#   e2e/kind/cluster.sh trust-registry HOST:PORT  # the node's containerd pulls from it over plain HTTP
#   e2e/kind/cluster.sh delete            # always succeeds; stops the registry, removes the cluster and its host dirs
#   e2e/kind/cluster.sh kubeconfig        # prints the kubeconfig path
#
# KIND_NODE_IMAGE=kindest/node:v1.37.2 uses kind's stock node image (needs registry access)
# instead of building local/kind-node:$KUBE_VERSION offline.
#
# The node gets two host directories (under $KIND_WORK/run-$CLUSTER_NAME):
#   fake/  -> /var/lib/unwedge-fake  the fake sysfs and /dev trees and the journal of their writes
#   state/ -> /var/lib/unwedge       the agent's state dir (outbox + attempt journal)
# so tests read both from the host, and both survive a restart of the node container.
set -euo pipefail
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
RUN=$KIND_WORK/run-$CLUSTER_NAME
KUBECONFIG_PATH=$RUN/kubeconfig

create() {
  local image
  if [ -n "${KIND_NODE_IMAGE:-}" ]; then
    KIND_ONLY=1 "$KIND_DIR/build-node-image.sh" >/dev/null
    image=$KIND_NODE_IMAGE
  else
    "$KIND_DIR/build-node-image.sh" >&2
    image=$LOCAL_NODE_IMAGE
  fi
  kind_path
  ensure_docker
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    log "cluster $CLUSTER_NAME exists: deleting it first"
    delete
  fi
  mkdir -p "$RUN/fake" "$RUN/state"
  cat > "$RUN/kind-config.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
  extraMounts:
  - hostPath: $RUN/fake
    containerPath: $FAKE_ROOT
  - hostPath: $RUN/state
    containerPath: /var/lib/unwedge
kubeadmConfigPatches:
- |
  kind: KubeletConfiguration
  failCgroupV1: false
containerdConfigPatches:
- |-
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
EOF
  if needs_privileged_shim; then
    log "capability bounding set lacks CAP_SYS_RESOURCE: kind runs through the --privileged shim"
  fi
  kind create cluster --name "$CLUSTER_NAME" --image "$image" --config "$RUN/kind-config.yaml" \
    --kubeconfig "$KUBECONFIG_PATH" --wait 5m >&2
  local i
  for i in $(seq 1 240); do
    kubectl --kubeconfig "$KUBECONFIG_PATH" get serviceaccount default >/dev/null 2>&1 && break
    sleep 0.5
  done
  kubectl --kubeconfig "$KUBECONFIG_PATH" get serviceaccount default >/dev/null || die "no default ServiceAccount after 2 min"
  echo "$KUBECONFIG_PATH"
}

delete() {
  "$KIND_DIR/registry.sh" stop
  kind_path 2>/dev/null || true
  if command -v kind >/dev/null 2>&1; then
    kind delete cluster --name "$CLUSTER_NAME" --kubeconfig "$KUBECONFIG_PATH" >&2 || true
  fi
  # Whatever kind could not remove (or when kind is missing): its containers carry this label.
  local ids
  ids=$(docker ps -aq --filter "label=io.x-k8s.kind.cluster=$CLUSTER_NAME" 2>/dev/null || true)
  [ -z "$ids" ] || docker rm -f -v $ids >/dev/null 2>&1 || true
  rm -rf "$RUN"
}

load() {
  [ $# -gt 0 ] || die "usage: cluster.sh load IMAGE..."
  kind_path
  kind load docker-image --name "$CLUSTER_NAME" "$@" >&2
}

# containerd reads /etc/containerd/certs.d/<host:port>/hosts.toml (config_path above) on each
# pull: this one sends HOST:PORT's pulls to it over plain HTTP, as `helm install` from a
# registry with --plain-http needs; no restart.
trust_registry() {
  [ $# = 1 ] || die "usage: cluster.sh trust-registry HOST:PORT"
  local node; node=$(node_container)
  docker exec "$node" mkdir -p "/etc/containerd/certs.d/$1"
  printf 'server = "http://%s"\n\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$1" "$1" |
    docker exec -i "$node" sh -c "cat > '/etc/containerd/certs.d/$1/hosts.toml'"
}

case "${1:-}" in
  create) create ;;
  delete) delete ;;
  load) shift; load "$@" ;;
  trust-registry) shift; trust_registry "$@" ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  *) die "usage: $0 create|delete|load IMAGE...|trust-registry HOST:PORT|kubeconfig" ;;
esac
