#!/usr/bin/env bash
# The kind suite (CI's entry point): build the offline node image (cached) -> build the images ->
# create the cluster -> load the images -> fake device plugin -> helm install -> scenarios ->
# delete the cluster (trap: always, also on failure; KEEP=1 keeps it).
#
#   e2e/kind/run.sh                     # every scenario
#   e2e/kind/run.sh helm_install wedge_rebind   # only these (helm_install always runs first)
#   KIND_NODE_IMAGE=kindest/node:v1.37.2 e2e/kind/run.sh   # stock node image, registry access
#
# Output: "timing:" lines per step, then one line per scenario: PASS, FAIL or NOT IMPLEMENTED.
# Exit status: 0 all scenarios passed; 1 a scenario or a step failed; 3 none failed but some
# are not implemented (a not implemented scenario never counts as passed).
set -euo pipefail
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
ROOT=$(cd "$E2E_DIR/.." && pwd)
RUN=$KIND_WORK/run-$CLUSTER_NAME
NODE=$(node_container)
NS=unwedge-system
RELEASE=unwedge
MUSL=x86_64-unknown-linux-musl

# The scenarios, in order. Each is a function s_<name>; it returns non-zero on failure.
SCENARIOS=(
  helm_install        # defaults: agent Ready, operator 2/2 + one Lease holder, /metrics, get gw, NOTES
  wedge_rebind        # WEDGED=rebind,bus-reset on device 3: consumer listed, only it evicted, rebind once, uncordon, replacement Running
  none_blamed_pid     # WEDGED=none with a PID in a container: only that pod evicted, no cordon
  admin_cordon_kept   # a node cordoned by an admin beforehand stays cordoned after recovery
  agent_restart       # agent pod deleted between approval and action: one execution in the journal
  leader_failover     # operator leader deleted mid-drain: the other replica finishes
  helm_upgrade_uninstall  # changed values upgrade; uninstall leaves only the CRDs, no node cordoned
)
declare -A RESULT=()
failed=0
selected=()

cleanup() {
  local rc=$?
  if [ $rc != 0 ] || [ $failed != 0 ]; then
    echo "--- pods"; kubectl get pods -A -o wide 2>/dev/null || true
    echo "--- gpuwedges"; kubectl get gpuwedges -o yaml 2>/dev/null | tail -80 || true
    echo "--- agent log"; kubectl -n $NS logs ds/$RELEASE-agent --tail=60 2>/dev/null || true
    echo "--- operator logs"; kubectl -n $NS logs deploy/$RELEASE-operator --tail=60 2>/dev/null || true
    echo "--- fake sysfs journal"; cat "$RUN/fake/journal.log" 2>/dev/null || true
  fi
  if [ "${KEEP:-}" = 1 ]; then
    echo "KEEP=1: cluster $CLUSTER_NAME kept (KUBECONFIG=$RUN/kubeconfig; delete: e2e/kind/cluster.sh delete)"
  else
    "$KIND_DIR/cluster.sh" delete
    lap "delete cluster"
  fi
  summary
  if [ $rc != 0 ]; then exit $rc; fi
}
summary() {
  echo "=== kind suite"
  local s st=0
  for s in "${SCENARIOS[@]}"; do
    if [[ " ${selected[*]} " != *" $s "* ]]; then echo "not selected: $s"; continue; fi
    echo "${RESULT[$s]:-NOT RUN}: $s"
    case "${RESULT[$s]:-NOT RUN}" in
      PASS) ;;
      "NOT IMPLEMENTED") [ $st = 1 ] || st=3 ;;
      *) st=1 ;;
    esac
  done
  [ $failed = 0 ] || st=1
  exit_status=$st
}
trap 'cleanup; exit $exit_status' EXIT
exit_status=1

# --- helpers -----------------------------------------------------------------------------
k() { kubectl "$@"; }
ne() { docker exec "$NODE" "$@"; }          # a command in the kind node
expect() { # expect "<what>" cmd...: prints and fails the scenario when cmd fails
  local what=$1; shift
  # Scenarios run in a subshell: the first failed expectation ends the scenario.
  if "$@"; then echo "  ok: $what"; else echo "  FAILED: $what"; exit 1; fi
}
wait_until() { # wait_until <seconds> cmd...
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt $end ] || return 1; sleep 1; done
}
pod_holding() { # the namespace/pod the real kubelet reports holding BDF $1
  ne podresources-list | awk -v b="$1" '$3 == "unwedge.io/fake-gpu" && $4 == b { print $1 }'
}
agent_pid() { # the agent container's main process, as a PID of the node's namespace
  local pod cid
  pod=$(k -n $NS get pod -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}')
  cid=$(k -n $NS get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')
  ne crictl inspect "${cid#containerd://}" | jq -r .info.pid
}
journal_count() { # lines of the fake sysfs journal whose file ends with $1 and value is $2
  awk -F'\t' -v f="$1" -v v="$2" 'substr($2, length($2) - length(f) + 1) == f && $3 == v' \
    "$RUN/fake/journal.log" 2>/dev/null | wc -l
}
inject() { # inject <cardN> <bdf> <bridge> <methods> [extra uevent-inject args...]
  local card=$1 bdf=$2 bridge=$3 methods=$4; shift 4
  local pid; pid=$(agent_pid)
  ne nsenter -n -t "$pid" /usr/local/bin/uevent-inject \
    --devpath "/devices/pci0000:00/$bridge/$bdf/drm/$card" --card "$card" --methods "$methods" "$@"
}

# --- scenarios -----------------------------------------------------------------------------
s_helm_install() {
  local out
  out=$("$HELM" install $RELEASE "$ROOT/charts/unwedge" -n $NS --create-namespace \
    --set agent.image.tag=dev --set agent.image.pullPolicy=Never \
    --set operator.image.tag=dev --set operator.image.pullPolicy=Never \
    --post-renderer "$KIND_DIR/helm-post-render.sh" --wait --timeout 3m 2>&1) || { echo "$out"; return 1; }
  echo "$out" | sed 's/^/  helm: /'
  expect "helm printed NOTES" grep -q '^NOTES:' <<<"$out"
  expect "agent DaemonSet: 1 pod Ready on $NODE" \
    wait_until 120 sh -c "[ \"\$(kubectl -n $NS get ds $RELEASE-agent -o jsonpath='{.status.numberReady}')\" = 1 ]"
  expect "operator Deployment 2/2 Ready" \
    wait_until 120 sh -c "[ \"\$(kubectl -n $NS get deploy $RELEASE-operator -o jsonpath='{.status.readyReplicas}')\" = 2 ]"
  local holder pods
  wait_until 60 sh -c "[ -n \"\$(kubectl -n $NS get lease unwedge-operator -o jsonpath='{.spec.holderIdentity}')\" ]" || true
  holder=$(k -n $NS get lease unwedge-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  pods=$(k -n $NS get pod -l app.kubernetes.io/component=operator -o jsonpath='{.items[*].metadata.name}')
  expect "exactly one Lease holder ('$holder'), one of the operator pods ($pods)" \
    sh -c "[ -n '$holder' ] && [ \$(echo '$pods' | tr ' ' '\n' | grep -c -x -F '$holder') = 1 ]"
  local apod metrics
  apod=$(k -n $NS get pod -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}')
  metrics=$(k get --raw "/api/v1/namespaces/$NS/pods/$apod:9101/proxy/metrics" 2>&1 || true)
  expect "agent /metrics answers with Prometheus text" grep -q '^# \(HELP\|TYPE\) ' <<<"$metrics"
  local opod
  opod=$(k -n $NS get pod -l app.kubernetes.io/component=operator -o jsonpath='{.items[0].metadata.name}')
  metrics=$(k get --raw "/api/v1/namespaces/$NS/pods/$opod:9100/proxy/metrics" 2>&1 || true)
  expect "operator /metrics answers with Prometheus text" grep -q '^# \(HELP\|TYPE\) ' <<<"$metrics"
  expect "kubectl get gw works" k get gw
}

s_wedge_rebind() {
  local card=card3 bdf=0000:06:00.0 bridge=0000:00:04.0 label=0000-06-00.0
  # Eight one-GPU pods fill the node, so device 3 surely has a consumer.
  k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: gpu-work, namespace: default}
spec:
  replicas: 8
  selector: {matchLabels: {app: gpu-work}}
  template:
    metadata: {labels: {app: gpu-work}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: work
        image: registry.k8s.io/pause:$PAUSE_VERSION
        imagePullPolicy: Never
        resources: {limits: {unwedge.io/fake-gpu: 1}}
EOF
  expect "8 GPU pods Ready" k rollout status deploy/gpu-work --timeout=180s
  local victim others before_journal
  victim=$(pod_holding $bdf)
  expect "the real kubelet reports a consumer of $bdf ($victim)" [ -n "$victim" ]
  others=$(k get pods -l app=gpu-work -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}' | sort)
  local victim_uid; victim_uid=$(k get pod "${victim#default/}" -o jsonpath='{.metadata.uid}')
  others=$(grep -v -x "$victim_uid" <<<"$others")
  before_journal=$(journal_count /bind $bdf)

  expect "uevent injected into the agent's network namespace" inject $card $bdf $bridge rebind,bus-reset
  local gw=""
  wait_until 60 sh -c "kubectl get gw -l unwedge.io/device=$label -o name | grep -q ." || true
  gw=$(k get gw -l unwedge.io/device=$label -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "its consumers list the pod the kubelet reports (${victim})" \
    wait_until 60 sh -c "kubectl get gw $gw -o jsonpath='{range .status.consumers[*]}{.namespace}/{.pod}{\"\\n\"}{end}' | grep -qx '$victim'"
  expect "the GpuWedge reaches Recovered" \
    wait_until 300 sh -c "[ \"\$(kubectl get gw $gw -o jsonpath='{.status.phase}')\" = Recovered ]"
  expect "the consumer pod ($victim, uid $victim_uid) is really gone" \
    wait_until 60 sh -c "! kubectl get pods -l app=gpu-work -o jsonpath='{.items[*].metadata.uid}' | grep -qw '$victim_uid'"
  local now; now=$(k get pods -l app=gpu-work -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}' | sort)
  local untouched; untouched=$(comm -12 <(echo "$others") <(echo "$now") | grep -c . || true)
  expect "the 7 other GPU pods were not touched (still there: $untouched)" [ "$untouched" = 7 ]
  expect "unbind of $bdf journaled exactly once" [ "$(journal_count /unbind $bdf)" = 1 ]
  expect "bind of $bdf journaled exactly once more" [ "$(journal_count /bind $bdf)" = $((before_journal + 1)) ]
  expect "no reset written (rebind sufficed)" [ "$(journal_count $bdf/reset 1)" = 0 ]
  expect "the attempt is Succeeded with method rebind" \
    sh -c "kubectl get gw $gw -o jsonpath='{range .status.attempts[*]}{.method}={.result}{\"\\n\"}{end}' | grep -qx 'rebind=Succeeded'"
  expect "the node is schedulable again and carries no cordoned-by annotation" \
    wait_until 60 sh -c "[ -z \"\$(kubectl get node $NODE -o jsonpath='{.spec.unschedulable}{.metadata.annotations.unwedge\\.io/cordoned-by}')\" ]"
  expect "the Deployment's replacement pod is Running (8/8 ready)" k rollout status deploy/gpu-work --timeout=120s
  local holders; holders=$(ne podresources-list | grep -c '^default/gpu-work-.* unwedge.io/fake-gpu ' || true)
  expect "the real kubelet reports 8 gpu-work pods on fake GPUs again (got $holders)" [ "$holders" = 8 ]
  k delete deploy gpu-work --wait=true >/dev/null
}

not_implemented() { echo "  not implemented yet: $1"; RESULT[$1]="NOT IMPLEMENTED"; }

# --- prerequisites ------------------------------------------------------------------------
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${SCENARIOS[@]}")
[[ " ${selected[*]} " == *" helm_install "* ]] || selected=(helm_install "${selected[@]}")

"$KIND_DIR/build-node-image.sh" >&2
lap "node image (cached or built)"
[ -x "$CP_BIN/helm" ] || "$E2E_DIR/cluster/build-binaries.sh" >/dev/null
HELM=$CP_BIN/helm
kind_path
"$KIND_DIR/fake-device-plugin/build.sh" >/dev/null
lap "fake device plugin image"
[ -x "$ROOT/images/build.sh" ] || die "images/build.sh is missing: the unwedge images cannot be built"
"$ROOT/images/build.sh" dev >&2
lap "unwedge images"
have_inject=0
if ( cd "$ROOT" && cargo build -q -p uevent-inject --release --target $MUSL --bin uevent-inject ) >&2; then
  have_inject=1
else
  log "uevent-inject could not be built: the injection scenarios will FAIL"
fi
lap "uevent-inject"

export KUBECONFIG
KUBECONFIG=$("$KIND_DIR/cluster.sh" create)
lap "create cluster"
"$KIND_DIR/cluster.sh" load "$PLUGIN_IMAGE" unwedge/agent:dev unwedge/operator:dev
lap "load images"
k apply -f "$KIND_DIR/manifests/fake-device-plugin.yaml" >/dev/null
k -n kube-system rollout status ds/fake-device-plugin --timeout=120s >/dev/null
wait_until 60 sh -c "[ \"\$(kubectl get node $NODE -o jsonpath='{.status.allocatable.unwedge\\.io/fake-gpu}')\" = 8 ]" \
  || die "the node does not offer 8 unwedge.io/fake-gpu"
docker cp "$KIND_WORK/fake-device-plugin/podresources-list" "$NODE:/usr/local/bin/podresources-list"
[ $have_inject = 0 ] || docker cp "${CARGO_TARGET_DIR:-$ROOT/target}/$MUSL/release/uevent-inject" "$NODE:/usr/local/bin/uevent-inject"
k label node "$NODE" unwedge.io/gpu=true >/dev/null
lap "fake device plugin ready"

for s in "${selected[@]}"; do
  echo "=== scenario $s"
  if ! declare -F "s_$s" >/dev/null; then not_implemented "$s"; continue; fi
  if [ "$s" != helm_install ] && [ "${RESULT[helm_install]:-}" != PASS ]; then
    echo "  skipped: helm_install did not pass"; RESULT[$s]="FAIL (helm_install failed)"; failed=1; continue
  fi
  if ( "s_$s" ); then RESULT[$s]=PASS; else RESULT[$s]=FAIL; failed=1; fi
  lap "scenario $s"
done
echo "--- kubectl get pods -A"
k get pods -A -o wide
