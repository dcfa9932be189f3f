#!/usr/bin/env bash
# Smoke test of the kind tier without unwedge itself: the offline node image boots, the fake GPU
# device plugin registers with the real kubelet, the kubelet allocates a fake GPU to a pod, the
# real PodResources API reports which pod holds which BDF, writes to the fake sysfs control files
# from inside the node are journaled and applied, and the plugin registers again after a kubelet
# restart. The cluster is deleted at the end, also on failure (KEEP=1 keeps it).
# Prints "timing:" lines per step and "PASS"/"FAIL" lines per check.
set -euo pipefail
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
RUN=$KIND_WORK/run-$CLUSTER_NAME
NODE=$(node_container)
failed=0
completed=0   # set by the last line: a run that did not get there never counts as passed
check() { # check "<what>" cmd...
  local what=$1; shift
  if "$@"; then echo "PASS: $what"; else echo "FAIL: $what"; failed=1; return 1; fi
}
cleanup() {
  local rc=$?
  if [ $rc != 0 ] || [ $failed != 0 ]; then
    echo "--- fake-device-plugin log"; kubectl -n kube-system logs ds/fake-device-plugin --tail=50 2>/dev/null || true
    echo "--- pods"; kubectl get pods -A -o wide 2>/dev/null || true
  fi
  if [ "${KEEP:-}" = 1 ]; then echo "KEEP=1: cluster $CLUSTER_NAME kept (KUBECONFIG=$RUN/kubeconfig)"; return; fi
  "$KIND_DIR/cluster.sh" delete
  lap "delete cluster"
  if [ $completed = 1 ] && [ $failed = 0 ] && [ $rc = 0 ]; then
    echo "smoke: all checks passed"
  else
    echo "smoke: FAILED (completed=$completed, exit status $rc)"
    exit 1
  fi
}
trap cleanup EXIT

"$KIND_DIR/build-node-image.sh" >&2
lap "node image (cached or built)"
"$KIND_DIR/fake-device-plugin/build.sh" >/dev/null
lap "plugin image"
kind_path
export KUBECONFIG
KUBECONFIG=$("$KIND_DIR/cluster.sh" create)
lap "create cluster"
"$KIND_DIR/cluster.sh" load "$PLUGIN_IMAGE"
lap "load plugin image"

kubectl apply -f "$KIND_DIR/manifests/fake-device-plugin.yaml" >/dev/null
kubectl -n kube-system rollout status ds/fake-device-plugin --timeout=120s >/dev/null
lap "plugin DaemonSet ready"
alloc() { kubectl get node "$NODE" -o jsonpath='{.status.allocatable.unwedge\.io/fake-gpu}'; }
for _ in $(seq 1 120); do [ "$(alloc)" = 8 ] && break; sleep 0.5; done
check "node allocatable unwedge.io/fake-gpu = 8 (got '$(alloc)')" [ "$(alloc)" = 8 ]
lap "allocatable 8"

kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: gpu-consumer
  namespace: default
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: work
    image: registry.k8s.io/pause:$PAUSE_VERSION
    imagePullPolicy: Never
    resources:
      limits:
        unwedge.io/fake-gpu: 1
EOF
kubectl wait --for=condition=Ready pod/gpu-consumer --timeout=120s >/dev/null
lap "GPU pod Ready"

cid=$(kubectl get pod gpu-consumer -o jsonpath='{.status.containerStatuses[0].containerID}'); cid=${cid#containerd://}
envs=$(docker exec "$NODE" crictl inspect "$cid" | jq -r '.info.config.envs[] | "\(.key)=\(.value)"')
bdf=$(sed -n 's/^FAKE_GPU=//p' <<<"$envs")
check "container got FAKE_GPU=<one BDF> from Allocate (got '$bdf')" grep -Eq '^0000:(0[3-9a]):00\.0$' <<<"$bdf"
mounts=$(docker exec "$NODE" crictl inspect "$cid" | jq -r '.status.mounts[].containerPath')
check "container has the fake /dev/dri card and render files mounted" grep -q '^/dev/dri/card' <<<"$mounts"

out=$KIND_WORK/fake-device-plugin
docker cp "$out/podresources-list" "$NODE:/usr/local/bin/podresources-list" >/dev/null
listing=$(docker exec "$NODE" podresources-list)
echo "PodResources List (real kubelet): $listing"
check "PodResources reports default/gpu-consumer holding $bdf" \
  grep -qx "default/gpu-consumer work unwedge.io/fake-gpu $bdf" <<<"$listing"
n=$(docker exec "$NODE" podresources-list -allocatable | grep -c ' unwedge.io/fake-gpu ' || true)
check "PodResources allocatable lists 8 fake GPUs (got $n)" [ "$n" = 8 ]
lap "PodResources checks"

F=$FAKE_ROOT/sysfs
host_fake=$RUN/fake
drv_link=$host_fake/sysfs/bus/pci/devices/0000:06:00.0/driver
docker exec "$NODE" test -L "$F/class/drm/card3" && docker exec "$NODE" test -p "$F/bus/pci/drivers/amdgpu/unbind"
check "fake sysfs laid out in the node (card3 link, unbind FIFO)" [ -L "$host_fake/sysfs/class/drm/card3" ]
docker exec "$NODE" timeout 10 sh -c "echo 0000:06:00.0 > $F/bus/pci/drivers/amdgpu/unbind"
for _ in $(seq 1 50); do [ -L "$drv_link" ] || break; sleep 0.1; done
check "unbind written in the node removed 0000:06:00.0's driver link" [ ! -L "$drv_link" ]
docker exec "$NODE" timeout 10 sh -c "echo 1 > $F/bus/pci/devices/0000:06:00.0/reset"
docker exec "$NODE" timeout 10 sh -c "echo 0000:06:00.0 > $F/bus/pci/drivers/amdgpu/bind"
for _ in $(seq 1 50); do [ -L "$drv_link" ] && break; sleep 0.1; done
check "bind written in the node restored the driver link" [ -L "$drv_link" ]
for _ in $(seq 1 50); do [ "$(wc -l < "$host_fake/journal.log" 2>/dev/null || echo 0)" -ge 3 ] && break; sleep 0.1; done
echo "--- journal"; cat "$host_fake/journal.log" || true
check "journal holds exactly unbind, reset, bind in order" \
  diff <(cut -f2,3 "$host_fake/journal.log") <(printf '%s\t%s\n' \
    sysfs/bus/pci/drivers/amdgpu/unbind 0000:06:00.0 \
    sysfs/devices/pci0000:00/0000:00:04.0/0000:06:00.0/reset 1 \
    sysfs/bus/pci/drivers/amdgpu/bind 0000:06:00.0)
lap "fake sysfs journal"

docker exec "$NODE" systemctl restart kubelet
for _ in $(seq 1 120); do
  kubectl -n kube-system logs ds/fake-device-plugin 2>/dev/null | grep -q 'kubelet restarted' && break; sleep 0.5
done
check "plugin noticed the kubelet restart and registered again" \
  sh -c "kubectl -n kube-system logs ds/fake-device-plugin | grep -A3 'kubelet restarted' | grep -q registered"
n=0
for _ in $(seq 1 60); do
  n=$(docker exec "$NODE" podresources-list -allocatable 2>/dev/null | grep -c ' unwedge.io/fake-gpu ' || true)
  [ "$n" = 8 ] && break; sleep 0.5
done
check "after the kubelet restart the kubelet allocates 8 fake GPUs again (got $n)" [ "$n" = 8 ]
kubectl delete pod gpu-consumer --wait=true --timeout=60s >/dev/null
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: gpu-consumer-2
  namespace: default
spec:
  containers:
  - name: work
    image: registry.k8s.io/pause:$PAUSE_VERSION
    imagePullPolicy: Never
    resources:
      limits:
        unwedge.io/fake-gpu: 2
EOF
check "a 2-GPU pod runs after the kubelet restart" kubectl wait --for=condition=Ready pod/gpu-consumer-2 --timeout=120s
check "PodResources reports 2 BDFs for it" \
  sh -c "[ \$(docker exec $NODE podresources-list | grep -c '^default/gpu-consumer-2 work unwedge.io/fake-gpu ') = 2 ]"
lap "kubelet restart re-registration"
kubectl get pods -A -o wide
[ $failed = 0 ]
completed=1
