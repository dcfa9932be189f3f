#!/usr/bin/env bash
# The kind suite (CI's entry point): build the offline node image (cached) -> create the cluster
# -> start an OCI registry (CNCF distribution) -> `make release` into it (multi-arch images and
# the chart, pushed; digests) -> fake device plugin -> helm install from oci:// with the images
# pinned by digest, pulled by the node's containerd from the registry -> scenarios -> delete the
# cluster and stop the registry (trap: always, also on failure; KEEP=1 keeps both).
#
#   e2e/kind/run.sh                     # every scenario
#   e2e/kind/run.sh helm_install wedge_rebind   # only these (helm_install always runs first)
#   KIND_NODE_IMAGE=kindest/node:v1.37.2 e2e/kind/run.sh   # stock node image, registry access
#   UNWEDGE_ARCHES=amd64 e2e/kind/run.sh   # images for linux/amd64 only (default: amd64 and arm64)
#
# Output: "timing:" lines per step, `kubectl get pods -A` of the running cluster, then one line
# per scenario: PASS or FAIL. Exit status: 0 only when every selected scenario passed; 1 otherwise
# (a failed step, a failed scenario, an unknown scenario name).
#
# Safety: the reboot rung never runs here. The kind install leaves reboot out of the policy's
# allowed methods and escalation, and sets the agent's reboot mode to `command` with the command
# `false` (run as an argv; the FROM-scratch image holds no program but the agent, so even a reboot
# approval could only fail). Besides, the suite stops unless the
# agent's PID namespace is the kind node's own, not this machine's.
set -euo pipefail
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
ROOT=$(cd "$E2E_DIR/.." && pwd)
RUN=$KIND_WORK/run-$CLUSTER_NAME
NODE=$(node_container)
NS=unwedge-system
RELEASE=unwedge
MUSL=x86_64-unknown-linux-musl
# Set by the release step (tools/release.sh's release.env): where the chart and images are.
REGISTRY="" CHART_VERSION="" AGENT_DIGEST="" OPERATOR_DIGEST=""

# The scenarios, in order. Each is a function s_<name>; it returns non-zero on failure.
SCENARIOS=(
  helm_install        # the README's install: labeled namespace, observe only; agent Ready, operator 2/2 + one Lease holder, /metrics, get gw, NOTES
  first_run           # the README's first run: a wedge recorded, nothing touched; view reads, cannot approve; switch to automatic; approver approves
  wedge_rebind        # WEDGED=rebind,bus-reset on device 3: consumer listed, only it evicted, rebind once, uncordon, replacement Running
  none_restart_in_place  # WEDGED=none with a PID in a container: that container restarts in its pod, no eviction, no cordon
  none_evict_timing   # the same with none.restart Evict: that pod evicted and replaced (timing beside in place)
  none_fallbacks      # restartPolicy Never pod evicted instead (reason recorded); a PID of no pod restarts nothing
  admin_cordon_kept   # a node cordoned by an admin beforehand stays cordoned after recovery
  agent_restart       # agent pod deleted between approval and action: one execution in the journal
  leader_failover     # operator leader deleted mid-drain: the other replica finishes
  helm_upgrade_uninstall  # changed values upgrade; uninstall leaves only the CRDs, no node cordoned
)
# Known to fail, so not in the default run (run them by name; each with a comment saying why).
# Listed as not run, never as passed. None now.
KNOWN_FAILING=()
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
    echo "KEEP=1: cluster $CLUSTER_NAME and registry ${REGISTRY:-(none)} kept (KUBECONFIG=$RUN/kubeconfig; delete both: e2e/kind/cluster.sh delete)"
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
  for s in "${SCENARIOS[@]}" "${KNOWN_FAILING[@]}"; do
    if [[ " ${selected[*]} " != *" $s "* ]]; then
      if [[ " ${KNOWN_FAILING[*]} " == *" $s "* ]]; then echo "NOT RUN (known failing, see run.sh): $s"; else echo "not selected: $s"; fi
      continue
    fi
    echo "${RESULT[$s]:-NOT RUN}: $s"
    [ "${RESULT[$s]:-NOT RUN}" = PASS ] || st=1
  done
  for s in "${selected[@]}"; do
    [[ " ${SCENARIOS[*]} ${KNOWN_FAILING[*]} " == *" $s "* ]] || { echo "UNKNOWN: $s"; st=1; }
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
wait_fine() { # wait_fine <seconds> cmd...: wait_until, checking every 0.1 s (for timing lines)
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt $end ] || return 1; sleep 0.1; done
}
# The helm flags of the kind install (after the release step): the chart from the registry, the
# images from the registry pinned by digest (as the README's install does), the fake sysfs and
# /dev trees as the agent's host paths, and no reboot rung (see Safety above).
chart_flags() {
  CHART=(oci://$REGISTRY/charts/unwedge --version "$CHART_VERSION" --plain-http)
  HELM_SET=(
  --set global.imageRegistry=$REGISTRY
  --set agent.image.digest=$AGENT_DIGEST --set operator.image.digest=$OPERATOR_DIGEST
  --set agent.sysfsHostPath=/var/lib/unwedge-fake/sysfs --set agent.devHostPath=/var/lib/unwedge-fake/dev
  --set agent.reboot.mode=command --set-string agent.reboot.command=false
  --set "defaultPolicy.allowedMethods={rebind,bus-reset}" --set "defaultPolicy.escalation={rebind,bus-reset}"
  # The suite wedges one node's GPUs 10 times within minutes; the default breaker (more than 10
  # within 1h) would trip on an 11th.
  --set defaultPolicy.circuitBreaker.count=20
  )
}
dev() { # dev N: sets card, bdf, bridge and label of fake GPU N (card0 = 0000:03:00.0 behind 0000:00:01.0)
  card=card$1
  printf -v bdf '0000:%02x:00.0' $((3 + $1))
  printf -v bridge '0000:00:%02x.0' $((1 + $1))
  label=${bdf//:/-}
}
pod_holding() { # the namespace/pod the real kubelet reports holding BDF $1
  ne podresources-list | awk -v b="$1" '$3 == "unwedge.io/fake-gpu" && $4 == b { print $1 }'
}
agent_pod() { # the running agent pod (not one being deleted)
  k -n $NS get pod -l app.kubernetes.io/component=agent -o json |
    jq -r '[.items[] | select(.metadata.deletionTimestamp == null and .status.phase == "Running")][0].metadata.name // empty'
}
container_pid() { # container_pid <ns> <pod>: the main process of its first container, as a PID of the node's namespace
  local cid
  cid=$(k -n "$1" get pod "$2" -o jsonpath='{.status.containerStatuses[0].containerID}')
  [ -n "$cid" ] || return 1
  ne crictl inspect "${cid#containerd://}" | jq -r .info.pid
}
agent_pid() { container_pid $NS "$(agent_pod)"; }
journal_count() { # lines of the fake sysfs journal whose file ends with $1 and value is $2
  awk -F'\t' -v f="$1" -v v="$2" 'substr($2, length($2) - length(f) + 1) == f && $3 == v' \
    "$RUN/fake/journal.log" 2>/dev/null | wc -l
}
journal_lines_of() { # lines of the fake sysfs journal that name BDF $1 (in the file or the value)
  grep -c -F "$1" "$RUN/fake/journal.log" 2>/dev/null || true
}
inject() { # inject <cardN> <bdf> <bridge> <methods> [extra uevent-inject args...]
  local card=$1 bdf=$2 bridge=$3 methods=$4; shift 4
  local pid; pid=$(agent_pid)
  [ -n "$pid" ] && [ "$pid" != null ] || { echo "  no agent process to inject into"; return 1; }
  ne nsenter -n -t "$pid" /usr/local/bin/uevent-inject \
    --devpath "/devices/pci0000:00/$bridge/$bdf/drm/$card" --card "$card" --methods "$methods" "$@"
}
gw_of() { # the GpuWedge of device label $1 created after the scenario began (waits up to 60s)
  local known=${2:-}
  wait_until 60 sh -c "kubectl get gw -l unwedge.io/device=$1 -o name | grep -v -x -F -e '${known:-none}' | grep -q ." || true
  k get gw -l unwedge.io/device="$1" -o name | grep -v -x -F -e "${known:-none}" | head -1 | sed 's#.*/##'
}
pods_run_image() { # pods_run_image <component> <ref>: its pods' image is ref, and so is the imageID the node's containerd reports
  local lines
  lines=$(k -n $NS get pod -l app.kubernetes.io/component="$1" -o jsonpath='{range .items[*]}{.spec.containers[0].image} {.status.containerStatuses[0].imageID}{"\n"}{end}')
  echo "    $lines" | head -3
  [ -n "$lines" ] && ! grep -v -x -F "$2 $2" <<<"$lines" | grep -q .
}
gw_phase() { k get gw "$1" -o jsonpath='{.status.phase}'; }
wait_phase() { # wait_phase <gw> <phase> <seconds>
  wait_until "$3" sh -c "[ \"\$(kubectl get gw $1 -o jsonpath='{.status.phase}')\" = $2 ]"
}
attempts() { # method=result lines of a GpuWedge's attempts
  k get gw "$1" -o jsonpath='{range .status.attempts[*]}{.attempt} {.method}={.result}{"\n"}{end}'
}
node_clean() { # the node is schedulable and carries no cordoned-by annotation
  [ -z "$(k get node $NODE -o jsonpath='{.spec.unschedulable}{.metadata.annotations.unwedge\.io/cordoned-by}')" ]
}
gpu_uids() { k get pods -l app=gpu-work -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}' | sort; }
gpu_work_up() { # eight one-GPU pods fill the node, so every fake GPU has a consumer
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
  expect "8 GPU pods Ready" sh -c "kubectl rollout status deploy/gpu-work --timeout=180s >/dev/null"
}
replaced_and_ready() { # replaced_and_ready <uid>: that pod is gone and 8 gpu-work pods are Ready
  local rows
  rows=$(kubectl get pods -l app=gpu-work -o jsonpath='{range .items[*]}{.metadata.uid} {.status.containerStatuses[0].ready}{"\n"}{end}')
  ! grep -qw "$1" <<<"$rows" && [ "$(grep -c ' true$' <<<"$rows")" = 8 ]
}
gpu_work_down() {
  k delete deploy gpu-work --ignore-not-found --wait=true >/dev/null
  wait_until 60 sh -c "[ -z \"\$(kubectl get pods -l app=gpu-work -o name)\" ]" || true
}
only_victim_gone() { # only_victim_gone <victim uid> <uids before>: the victim vanished, the 7 others did not
  local victim_uid=$1 before=$2
  expect "the evicted pod (uid $victim_uid) is really gone" \
    wait_until 60 sh -c "! kubectl get pods -l app=gpu-work -o jsonpath='{.items[*].metadata.uid}' | grep -qw '$victim_uid'"
  local others untouched
  others=$(grep -v -x "$victim_uid" <<<"$before")
  untouched=$(comm -12 <(echo "$others") <(gpu_uids) | grep -c . || true)
  expect "the 7 other GPU pods were not touched (still there: $untouched)" [ "$untouched" = 7 ]
}

# --- scenarios -----------------------------------------------------------------------------
s_helm_install() {
  local out
  # The README's install, step by step: the namespace labeled for the privileged agent, then the
  # observe-only first run (defaultPolicy.dryRun=true; s_first_run switches to automatic).
  k create namespace $NS >/dev/null
  k label namespace $NS pod-security.kubernetes.io/enforce=privileged >/dev/null
  out=$("$HELM" install $RELEASE "${CHART[@]}" -n $NS "${HELM_SET[@]}" --set defaultPolicy.dryRun=true \
    --wait --timeout 3m 2>&1) || { echo "$out"; return 1; }
  echo "$out" | sed 's/^/  helm: /'
  expect "helm printed NOTES" grep -q '^NOTES:' <<<"$out"
  expect "agent DaemonSet: 1 pod Ready on $NODE" \
    wait_until 120 sh -c "[ \"\$(kubectl -n $NS get ds $RELEASE-agent -o jsonpath='{.status.numberReady}')\" = 1 ]"
  # Safety: hostPID must mean the kind node's PID namespace, never this machine's (Safety above).
  local node_ns own_ns agent_ns apid
  apid=$(agent_pid)
  own_ns=$(readlink /proc/self/ns/pid)
  node_ns=$(ne readlink /proc/1/ns/pid)
  agent_ns=$(ne readlink "/proc/$apid/ns/pid")
  if [ -z "$agent_ns" ] || [ "$agent_ns" != "$node_ns" ] || [ "$node_ns" = "$own_ns" ]; then
    echo "  FAILED: the agent's PID namespace ($agent_ns) must be the kind node's ($node_ns), not this machine's ($own_ns): stopping"
    exit 1
  fi
  echo "  ok: the agent's PID namespace is the kind node's ($node_ns), not this machine's ($own_ns)"
  expect "operator Deployment 2/2 Ready" \
    wait_until 120 sh -c "[ \"\$(kubectl -n $NS get deploy $RELEASE-operator -o jsonpath='{.status.readyReplicas}')\" = 2 ]"
  expect "the agent pod runs $REGISTRY/unwedge/agent@$AGENT_DIGEST, pulled from the registry" \
    pods_run_image agent "$REGISTRY/unwedge/agent@$AGENT_DIGEST"
  expect "both operator pods run $REGISTRY/unwedge/operator@$OPERATOR_DIGEST, pulled from the registry" \
    pods_run_image operator "$REGISTRY/unwedge/operator@$OPERATOR_DIGEST"
  # Ready includes the default policy: the operator applied it from the chart's ConfigMap.
  expect "the operator applied the default RecoveryPolicy (field manager unwedge-default-policy)" \
    sh -c "kubectl get recoverypolicy default -o jsonpath='{.metadata.managedFields[*].manager}' | grep -q unwedge-default-policy"
  local holder pods
  wait_until 60 sh -c "[ -n \"\$(kubectl -n $NS get lease unwedge-operator -o jsonpath='{.spec.holderIdentity}')\" ]" || true
  holder=$(k -n $NS get lease unwedge-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  pods=$(k -n $NS get pod -l app.kubernetes.io/component=operator -o jsonpath='{.items[*].metadata.name}')
  expect "exactly one Lease holder ('$holder'), one of the operator pods ($pods)" \
    sh -c "[ -n '$holder' ] && [ \$(echo '$pods' | tr ' ' '\n' | grep -c -x -F '$holder') = 1 ]"
  local apod metrics
  apod=$(agent_pod)
  metrics=$(k get --raw "/api/v1/namespaces/$NS/pods/$apod:9101/proxy/metrics" 2>&1 || true)
  expect "agent /metrics answers with Prometheus text" grep -q '^# \(HELP\|TYPE\) ' <<<"$metrics"
  local opod
  opod=$(k -n $NS get pod -l app.kubernetes.io/component=operator -o jsonpath='{.items[0].metadata.name}')
  metrics=$(k get --raw "/api/v1/namespaces/$NS/pods/$opod:9100/proxy/metrics" 2>&1 || true)
  expect "operator /metrics answers with Prometheus text" grep -q '^# \(HELP\|TYPE\) ' <<<"$metrics"
  expect "kubectl get gw works" k get gw
  expect "the default RecoveryPolicy observes only (spec.dryRun: true)" \
    sh -c "[ \"\$(kubectl get recoverypolicy default -o jsonpath='{.spec.dryRun}')\" = true ]"
}

# as_user <user>: a kubeconfig that acts as <user> (impersonated by the admin, no groups but
# system:authenticated), for kubectl and for the plugin alike (kubeconfig `as:`).
as_user() {
  local f=$RUN/as-$1.kubeconfig
  [ -s "$f" ] || k config view --raw --minify -o json | jq --arg u "$1" '.users[0].user.as = $u' >"$f"
  echo "$f"
}
plugin() { # plugin <user> args...: the released kubectl-unwedge (krew-installed), through kubectl, as <user>
  local user=$1; shift
  KUBECONFIG=$(as_user "$user") PATH="$RUN/krew/bin:$PATH" kubectl unwedge "$@"
}
cond_status() { # cond_status <gw> <type>: that condition's status (True/False/empty)
  k get gw "$1" -o jsonpath="{.status.conditions[?(@.type==\"$2\")].status}"
}
dry_run_recorded() { # dry_run_recorded <gw>: DryRun=True and the action says what would be done
  [ "$(cond_status "$1" DryRun)" = True ] && k get gw "$1" -o jsonpath='{.status.action}' | grep -q '^dry-run: would '
}

# The README's first run, as a person following it takes it, after helm_install's observe-only
# install: a wedge is recorded with what unwedge would do and nothing is touched; someone bound to
# `view` reads it (kubectl and the released plugin) and cannot approve; a user bound to nothing
# cannot read; the README's `helm upgrade --reuse-values --set defaultPolicy.dryRun=false`
# switches to automatic and the held wedge recovers. Then a policy with `approval: Manual`: the
# wedge waits drained, `view` cannot approve it, `unwedge-approver` can, and it recovers.
s_first_run() {
  # The plugin as a user installs it: krew, from the release's manifest and archive (its sha256
  # checked by krew), no index and no network.
  local krew_out
  rm -rf "$RUN/krew"
  krew_out=$(KREW_ROOT=$RUN/krew "$KREW" install --manifest="$RUN/release/krew/unwedge.yaml" \
    --archive="$(ls "$RUN"/release/kubectl-unwedge_v*_linux_amd64.tar.gz)" 2>&1) || { echo "$krew_out"; return 1; }
  expect "krew installed the plugin from the release's manifest" grep -q 'Installed plugin: unwedge' <<<"$krew_out"
  expect "kubectl finds it as a plugin (kubectl plugin list)" \
    sh -c "PATH='$RUN/krew/bin:$PATH' kubectl plugin list 2>/dev/null | grep -q '$RUN/krew/bin/kubectl-unwedge'"
  k create clusterrolebinding readme-alice-view --clusterrole=view --user=alice >/dev/null
  k create clusterrolebinding readme-bob-approver --clusterrole=$RELEASE-approver --user=bob >/dev/null
  local card bdf bridge label; dev 2
  gpu_work_up
  local before victim victim_uid journal0
  before=$(gpu_uids)
  victim=$(pod_holding $bdf)
  victim_uid=$(k get pod "${victim#default/}" -o jsonpath='{.metadata.uid}')
  journal0=$(journal_lines_of $bdf | grep -c . || true)

  expect "uevent injected (observe-only install)" inject $card $bdf $bridge rebind,bus-reset
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "it records what unwedge would do: DryRun=True, action 'dry-run: would …'" wait_until 60 dry_run_recorded $gw
  echo "  action: $(k get gw $gw -o jsonpath='{.status.action}')"
  sleep 5 # the operator had its look: nothing may follow it
  expect "the node is not cordoned and carries no cordoned-by annotation" node_clean
  expect "no GPU pod was evicted" [ "$(gpu_uids)" = "$before" ]
  expect "no sysfs write for $bdf" [ "$(journal_lines_of $bdf | grep -c . || true)" = "$journal0" ]
  expect "no approval was written" [ -z "$(k get gw $gw -o jsonpath='{.status.approval}')" ]

  expect "view (alice) lists it with kubectl get gw" sh -c "kubectl --as=alice get gw $gw -o name | grep -qx 'gpuwedge.unwedge.io/$gw'"
  local out
  out=$(plugin alice list 2>&1 || true)
  echo "$out" | sed 's/^/  alice$ kubectl unwedge list: /'
  expect "view (alice) lists it with the released plugin (kubectl unwedge list)" grep -q "$gw" <<<"$out"
  out=$(plugin alice describe $gw 2>&1 || true)
  expect "view (alice) reads it with kubectl unwedge describe (names $bdf)" grep -q "$bdf" <<<"$out"
  expect "view (alice) may not patch GpuWedges (kubectl auth can-i)" sh -c "! kubectl auth can-i patch gpuwedges.unwedge.io --as=alice | grep -qx yes"
  expect "view (alice) cannot write an approval with kubectl annotate" \
    sh -c "! kubectl --as=alice annotate gw $gw unwedge.io/approve= unwedge.io/by=alice >/dev/null 2>&1"
  expect "a user bound to nothing (carol) cannot read GpuWedges" sh -c "! kubectl --as=carol get gw >/dev/null 2>&1"
  expect "the wedge carries no approve annotation after alice's attempt" \
    [ -z "$(k get gw $gw -o jsonpath='{.metadata.annotations.unwedge\.io/approve}')" ]

  # The README's switch to automatic recovery.
  out=$("$HELM" upgrade $RELEASE "${CHART[@]}" -n $NS --reuse-values --set defaultPolicy.dryRun=false \
    --wait --timeout 3m 2>&1) || { echo "$out"; return 1; }
  expect "helm upgrade --reuse-values --set defaultPolicy.dryRun=false: revision 2" sh -c "'$HELM' status $RELEASE -n $NS | grep -q '^REVISION: 2'"
  expect "the default RecoveryPolicy recovers (spec.dryRun: false)" \
    wait_until 120 sh -c "[ \"\$(kubectl get recoverypolicy default -o jsonpath='{.spec.dryRun}')\" = false ]"
  expect "the held wedge is recovered automatically" wait_phase $gw Recovered 300
  expect "its attempt is rebind=Succeeded" sh -c "kubectl get gw $gw -o jsonpath='{range .status.attempts[*]}{.method}={.result}{\"\\n\"}{end}' | grep -qx 'rebind=Succeeded'"
  expect "the DryRun condition is no longer True" [ "$(cond_status $gw DryRun)" != True ]
  only_victim_gone "$victim_uid" "$before"
  expect "the node is schedulable again" wait_until 60 node_clean
  expect "8/8 GPU pods ready again" sh -c "kubectl rollout status deploy/gpu-work --timeout=120s >/dev/null"

  # Approval by a person: a policy that asks before every recovery (the default one asks before a
  # reboot, a rung this suite leaves out: Safety above).
  k patch recoverypolicy default --type merge -p '{"spec":{"approval":"Manual"}}' >/dev/null
  dev 5
  expect "uevent injected under approval: Manual" inject $card $bdf $bridge rebind,bus-reset
  gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "it waits in AwaitingApproval, drained" wait_phase $gw AwaitingApproval 180
  out=$(plugin alice approve $gw 2>&1) && { echo "$out"; expect "view (alice) cannot approve" false; }
  echo "$out" | head -1 | sed 's/^/  alice$ kubectl unwedge approve: /'
  expect "view (alice) cannot approve it: the plugin says which right is missing" grep -q 'missing RBAC: you may not patch' <<<"$out"
  out=$(plugin bob approve $gw 2>&1) || { echo "$out"; expect "the approver (bob) approves with kubectl unwedge approve" false; }
  echo "$out" | sed 's/^/  bob$ kubectl unwedge approve: /'
  expect "bob's wedge is recovered" wait_phase $gw Recovered 300
  expect "its approval names bob, the proven requester" [ "$(k get gw $gw -o jsonpath='{.status.approval.by}')" = bob ]
  expect "the node is schedulable again" wait_until 60 node_clean

  k patch recoverypolicy default --type merge -p '{"spec":{"approval":"Automatic"}}' >/dev/null
  k delete clusterrolebinding readme-alice-view readme-bob-approver >/dev/null
  gpu_work_down
}

s_wedge_rebind() {
  local card bdf bridge label; dev 3
  gpu_work_up
  local victim before before_journal victim_uid
  victim=$(pod_holding $bdf)
  expect "the real kubelet reports a consumer of $bdf ($victim)" [ -n "$victim" ]
  before=$(gpu_uids)
  victim_uid=$(k get pod "${victim#default/}" -o jsonpath='{.metadata.uid}')
  before_journal=$(journal_count /bind $bdf)

  expect "uevent injected into the agent's network namespace" inject $card $bdf $bridge rebind,bus-reset
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "its consumers list the pod the kubelet reports (${victim})" \
    wait_until 60 sh -c "kubectl get gw $gw -o jsonpath='{range .status.consumers[*]}{.namespace}/{.pod}{\"\\n\"}{end}' | grep -qx '$victim'"
  expect "the GpuWedge reaches Recovered" wait_phase $gw Recovered 300
  only_victim_gone "$victim_uid" "$before"
  expect "unbind of $bdf journaled exactly once" [ "$(journal_count /unbind $bdf)" = 1 ]
  expect "bind of $bdf journaled exactly once more" [ "$(journal_count /bind $bdf)" = $((before_journal + 1)) ]
  expect "no reset written (rebind sufficed)" [ "$(journal_count $bdf/reset 1)" = 0 ]
  expect "the attempt is Succeeded with method rebind" sh -c "kubectl get gw $gw -o jsonpath='{range .status.attempts[*]}{.method}={.result}{\"\\n\"}{end}' | grep -qx 'rebind=Succeeded'"
  expect "the node is schedulable again and carries no cordoned-by annotation" wait_until 60 node_clean
  expect "the Deployment's replacement pod is Running (8/8 ready)" sh -c "kubectl rollout status deploy/gpu-work --timeout=120s >/dev/null"
  local holders; holders=$(ne podresources-list | grep -c '^default/gpu-work-.* unwedge.io/fake-gpu ' || true)
  expect "the real kubelet reports 8 gpu-work pods on fake GPUs again (got $holders)" [ "$holders" = 8 ]
  gpu_work_down
}

# WEDGED=none on card1 blaming a process of the pod on card5: the default policy (none.action
# EvictBlamed, none.restart InPlace) restarts exactly the container that holds the PID, in its pod
# (same UID, restartCount + 1), through the node's real containerd; nothing evicted, no cordon,
# no sysfs write. Prints the in-place timing (uevent -> container running again).
s_none_restart_in_place() {
  local card bdf bridge label; dev 5
  local blamed_bdf=$bdf; dev 1
  gpu_work_up
  local blamed blamed_pod blamed_uid pid before lines_before restarts_before watchlog=$RUN/none-node-watch.log
  blamed=$(pod_holding $blamed_bdf)
  expect "the real kubelet reports a consumer of $blamed_bdf ($blamed)" [ -n "$blamed" ]
  blamed_pod=${blamed#default/}
  blamed_uid=$(k get pod "$blamed_pod" -o jsonpath='{.metadata.uid}')
  restarts_before=$(k get pod "$blamed_pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')
  pid=$(container_pid default "$blamed_pod")
  expect "PID $pid (node's namespace) is the main process of $blamed's container" grep -qx '[0-9]*[0-9]' <<<"$pid"
  before=$(gpu_uids)
  lines_before=$(journal_lines_of $bdf)
  k get node $NODE -w -o jsonpath='{.spec.unschedulable}/{.metadata.annotations.unwedge\.io/cordoned-by}{"\n"}' >"$watchlog" 2>&1 &
  watcher=$!   # global (this subshell's): the EXIT trap reads it
  trap 'kill ${watcher:-} 2>/dev/null || true' EXIT
  local t0; t0=$(date +%s.%N)
  expect "WEDGED=none PID=$pid injected for $bdf" inject $card $bdf $bridge none --pid "$pid" --task pause
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "it names the blamed pod $blamed" \
    wait_until 60 sh -c "[ \"\$(kubectl get gw $gw -o jsonpath='{.spec.blamed.pod.namespace}/{.spec.blamed.pod.name}')\" = '$blamed' ]"
  local want="$blamed_uid $((restarts_before + 1)) true"
  expect "the blamed container runs again in the same pod (restartCount $restarts_before -> $((restarts_before + 1)))" \
    wait_fine 120 sh -c "[ \"\$(kubectl get pod $blamed_pod -o jsonpath='{.metadata.uid} {.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].ready}')\" = '$want' ]"
  local t1; t1=$(date +%s.%N)
  echo "timing: none restart in place (uevent -> container running again): $(echo "$t1 - $t0" | bc) s"
  expect "the GpuWedge reaches Recovered" wait_phase $gw Recovered 180
  expect "the attempt is restart=Succeeded" sh -c "kubectl get gw $gw -o jsonpath='{range .status.attempts[*]}{.method}={.result}{\"\\n\"}{end}' | grep -qx 'restart=Succeeded'"
  local rec="work Restarted $restarts_before $((restarts_before + 1))"
  expect "the status records the restart ($rec)" \
    sh -c "[ \"\$(kubectl get gw $gw -o jsonpath='{.status.attempts[0].restarts[0].container} {.status.attempts[0].restarts[0].result} {.status.attempts[0].restarts[0].oldRestartCount} {.status.attempts[0].restarts[0].newRestartCount}')\" = '$rec' ]"
  expect "no pod was evicted: the same 8 GPU pods (uids) run" [ "$(gpu_uids)" = "$before" ]
  expect "the pod stayed on $NODE" [ "$(k get pod "$blamed_pod" -o jsonpath='{.spec.nodeName}')" = "$NODE" ]
  kill "$watcher" 2>/dev/null || true; wait "$watcher" 2>/dev/null || true
  expect "the node watch saw the node (got: $(head -c 200 "$watchlog"))" grep -q '^/' "$watchlog"
  expect "the node was never cordoned (watched: $(sort -u "$watchlog" | tr '\n' ' '))" \
    sh -c "! grep -q -e '^true' -e '/.' '$watchlog'"
  expect "nothing was written to $bdf's sysfs" [ "$(journal_lines_of $bdf)" = "$lines_before" ]
  gpu_work_down
}

# The same with eviction (none.restart: Evict set on the default policy): the blamed pod is
# evicted and its Deployment schedules a replacement. Prints the evict-and-reschedule timing
# (uevent -> replacement pod Ready) beside the in-place one above.
s_none_evict_timing() {
  local card bdf bridge label; dev 6
  local blamed_bdf=$bdf; dev 0
  gpu_work_up
  k patch recoverypolicy default --type merge -p '{"spec":{"none":{"restart":"Evict"}}}' >/dev/null
  local blamed blamed_pod blamed_uid pid before
  blamed=$(pod_holding $blamed_bdf)
  expect "the real kubelet reports a consumer of $blamed_bdf ($blamed)" [ -n "$blamed" ]
  blamed_pod=${blamed#default/}
  blamed_uid=$(k get pod "$blamed_pod" -o jsonpath='{.metadata.uid}')
  pid=$(container_pid default "$blamed_pod")
  before=$(gpu_uids)
  local t0; t0=$(date +%s.%N)
  expect "WEDGED=none PID=$pid injected for $bdf" inject $card $bdf $bridge none --pid "$pid" --task pause
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "the blamed pod is evicted and the Deployment is 8/8 Ready again with a replacement" \
    wait_fine 180 replaced_and_ready "$blamed_uid"
  local t1; t1=$(date +%s.%N)
  echo "timing: none evict and reschedule (uevent -> replacement pod Ready): $(echo "$t1 - $t0" | bc) s"
  only_victim_gone "$blamed_uid" "$before"
  expect "the GpuWedge reaches Recovered" wait_phase $gw Recovered 180
  expect "no attempt was approved (eviction only)" [ -z "$(attempts $gw)" ]
  k patch recoverypolicy default --type json -p '[{"op":"remove","path":"/spec/none/restart"}]' >/dev/null
  gpu_work_down
}

# A pod with restartPolicy Never cannot restart in place: the operator evicts it instead and says
# why; a blamed PID of no pod (the node's containerd) restarts nothing and evicts nothing.
s_none_fallbacks() {
  local card bdf bridge label; dev 7
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: gpu-once, namespace: default, labels: {app: gpu-once}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 2
  containers:
  - name: once
    image: registry.k8s.io/pause:$PAUSE_VERSION
    imagePullPolicy: Never
    resources: {limits: {unwedge.io/fake-gpu: 1}}
EOF
  expect "the restartPolicy Never pod is Ready" sh -c "kubectl wait pod/gpu-once --for=condition=Ready --timeout=120s >/dev/null"
  local held pid; held=$(ne podresources-list | awk '$1 == "default/gpu-once" && $3 == "unwedge.io/fake-gpu" { print $4 }')
  expect "the real kubelet reports the device of gpu-once ($held)" [ -n "$held" ]
  pid=$(container_pid default gpu-once)
  expect "WEDGED=none PID=$pid (a Never pod) injected for $bdf" inject $card $bdf $bridge none --pid "$pid" --task pause
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "the GpuWedge reaches Recovered" wait_phase $gw Recovered 180
  expect "gpu-once was evicted, not restarted" wait_until 60 sh -c "! kubectl get pod gpu-once -o name"
  expect "the reason is recorded (restartPolicy Never)" \
    sh -c "kubectl get gw $gw -o jsonpath='{.status.action} {.status.conditions[*].message}' | grep -q 'restartPolicy Never'"
  expect "no restart was approved" [ -z "$(attempts $gw)" ]
  # A blamed PID that belongs to no pod: containerd's own process on the node (on card3: a device
  # without an earlier none round, so none.minInterval cannot be why nothing happens).
  dev 3
  local cpid; cpid=$(ne pidof containerd | awk '{print $1}')
  expect "containerd's PID on the node ($cpid)" grep -qx '[0-9]*[0-9]' <<<"$cpid"
  gpu_work_up
  local before; before=$(k get pods -l app=gpu-work -o jsonpath='{range .items[*]}{.metadata.uid}={.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort)
  local known; known=$(k get gw -l unwedge.io/device=$label -o name)   # full names, one a line
  expect "WEDGED=none PID=$cpid (no pod) injected for $bdf" inject $card $bdf $bridge none --pid "$cpid" --task containerd
  gw=$(gw_of $label "$known")
  expect "a new GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "it is Recovered, recorded only because the driver blamed no pod" wait_phase $gw Recovered 180
  expect "its action says the driver blamed no pod" sh -c "kubectl get gw $gw -o jsonpath='{.status.action}' | grep -q 'blamed no pod'"
  expect "it restarted nothing (no attempt)" [ -z "$(attempts $gw)" ]
  expect "every GPU pod is the same pod with the same restart count" \
    [ "$(k get pods -l app=gpu-work -o jsonpath='{range .items[*]}{.metadata.uid}={.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort)" = "$before" ]
  gpu_work_down
}

# An admin cordoned the node before the wedge: unwedge recovers the device but never uncordons a
# node it did not cordon (docs/design.md §4 invariant 3).
s_admin_cordon_kept() {
  local card bdf bridge label; dev 2
  gpu_work_up
  local victim victim_uid before binds
  victim=$(pod_holding $bdf)
  expect "the real kubelet reports a consumer of $bdf ($victim)" [ -n "$victim" ]
  victim_uid=$(k get pod "${victim#default/}" -o jsonpath='{.metadata.uid}')
  before=$(gpu_uids)
  binds=$(journal_count /bind $bdf)
  expect "an admin cordons $NODE" sh -c "kubectl cordon $NODE >/dev/null"
  expect "uevent injected" inject $card $bdf $bridge rebind,bus-reset
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "the GpuWedge reaches Recovered" wait_phase $gw Recovered 300
  only_victim_gone "$victim_uid" "$before"
  expect "bind of $bdf journaled exactly once more" [ "$(journal_count /bind $bdf)" = $((binds + 1)) ]
  sleep 5   # an uncordon would follow Recovered at once
  expect "the node is still cordoned" [ "$(k get node $NODE -o jsonpath='{.spec.unschedulable}')" = true ]
  expect "and carries no unwedge.io/cordoned-by annotation" \
    [ -z "$(k get node $NODE -o jsonpath='{.metadata.annotations.unwedge\.io/cordoned-by}')" ]
  expect "the replacement pod waits (Pending) on the cordoned node" \
    sh -c "kubectl get pods -l app=gpu-work --field-selector=status.phase=Pending -o name | grep -q ."
  k uncordon $NODE >/dev/null
  expect "after the admin's uncordon the Deployment is 8/8 again" sh -c "kubectl rollout status deploy/gpu-work --timeout=120s >/dev/null"
  gpu_work_down
}

# The agent pod is deleted between the approval and the action: a process on the node (not a pod,
# so no drain removes it) holds card4, the fd gate blocks the approved attempt, the agent pod is
# deleted, the DaemonSet starts a new one; then the holder lets go. The independent journal of
# the fake sysfs shows exactly one execution.
s_agent_restart() {
  local card bdf bridge label; dev 4
  gpu_work_up
  local holder_pidfile=/tmp/unwedge-kind-holder.pid
  # A private mount namespace where the fake /dev is /dev, so the holder's fd reads /dev/dri/card4.
  ne sh -c "rm -f $holder_pidfile; setsid unshare -m --propagation private sh -c 'mount --bind $FAKE_ROOT/dev /dev && echo \$\$ > $holder_pidfile && exec sleep 600 3</dev/dri/$card' >/dev/null 2>&1 </dev/null &"
  expect "a node process holds /dev/dri/$card" wait_until 10 ne test -s $holder_pidfile
  hpid=$(ne cat $holder_pidfile)   # global (this subshell's): the EXIT trap reads it
  release_holder() { ne kill "${hpid:-}" 2>/dev/null || true; }
  trap release_holder EXIT
  local unbinds binds old_agent
  unbinds=$(journal_count /unbind $bdf); binds=$(journal_count /bind $bdf)
  old_agent=$(agent_pod)
  expect "uevent injected" inject $card $bdf $bridge rebind,bus-reset
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "the approved attempt is Blocked by the fd gate (holder pid $hpid)" \
    wait_until 240 sh -c "kubectl get gw $gw -o jsonpath='{range .status.attempts[*]}{.result}{\"\\n\"}{end}' | grep -qx Blocked"
  local first; first=$(attempts $gw | head -1)
  echo "  attempt: $first; message: $(k get gw $gw -o jsonpath='{.status.attempts[0].message}')"
  expect "nothing written to $bdf yet" [ "$(journal_count /unbind $bdf)" = "$unbinds" ]
  expect "the agent pod $old_agent is deleted" k -n $NS delete pod "$old_agent" --wait=true --timeout=90s
  expect "the DaemonSet runs a new agent pod, Ready" \
    wait_until 120 sh -c "[ \"\$(kubectl -n $NS get ds $RELEASE-agent -o jsonpath='{.status.numberReady}')\" = 1 ] && [ -n \"\$(kubectl -n $NS get pod -l app.kubernetes.io/component=agent -o name | grep -v -x 'pod/$old_agent')\" ]"
  # The new agent finds attempt ${first%% *} in the state dir's journal as started but never acted on
  # (still in the gate): it resumes the gate; had it begun acting, it would report Failed "agent
  # restarted during the attempt; not re-executed". Either way nothing may be written yet.
  sleep 10
  echo "  after the restart: $(k get gw $gw -o jsonpath='{range .status.attempts[*]}{.attempt} {.method}={.result} ({.message}); {end}')"
  expect "attempt ${first%% *} is not Succeeded while the holder holds $card" \
    sh -c "! kubectl get gw $gw -o jsonpath='{range .status.attempts[*]}{.attempt} {.result}{\"\\n\"}{end}' | grep -qx '${first%% *} Succeeded'"
  expect "still nothing written to $bdf while the holder holds $card" [ "$(journal_count /unbind $bdf)" = "$unbinds" ]
  release_holder
  expect "the GpuWedge reaches Recovered once the holder is gone" wait_phase $gw Recovered 300
  echo "  attempts: $(attempts $gw | tr '\n' ';')"
  expect "the journal shows one execution: one unbind of $bdf" [ "$(journal_count /unbind $bdf)" = $((unbinds + 1)) ]
  expect "and one bind" [ "$(journal_count /bind $bdf)" = $((binds + 1)) ]
  expect "exactly one attempt Succeeded" [ "$(attempts $gw | grep -c '=Succeeded$')" = 1 ]
  expect "the node is schedulable again" wait_until 60 node_clean
  expect "the Deployment is 8/8 again" sh -c "kubectl rollout status deploy/gpu-work --timeout=120s >/dev/null"
  gpu_work_down
}

# The operator's leader is deleted mid-drain: a PodDisruptionBudget holds the drain (evictions
# refused), the leader pod is deleted, the other replica takes the Lease and finishes once the
# budget is lifted.
s_leader_failover() {
  local card bdf bridge label; dev 6
  gpu_work_up
  k apply -f - >/dev/null <<EOF
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: gpu-work, namespace: default}
spec:
  maxUnavailable: 0
  selector: {matchLabels: {app: gpu-work}}
EOF
  local victim victim_uid before binds
  victim=$(pod_holding $bdf)
  victim_uid=$(k get pod "${victim#default/}" -o jsonpath='{.metadata.uid}')
  before=$(gpu_uids)
  binds=$(journal_count /bind $bdf)
  expect "uevent injected" inject $card $bdf $bridge rebind,bus-reset
  local gw; gw=$(gw_of $label)
  expect "a GpuWedge for $bdf exists ($gw)" [ -n "$gw" ]
  expect "the GpuWedge is Draining (eviction refused by the PodDisruptionBudget)" wait_phase $gw Draining 120
  local leader others
  leader=$(k -n $NS get lease unwedge-operator -o jsonpath='{.spec.holderIdentity}')
  others=$(k -n $NS get pod -l app.kubernetes.io/component=operator -o jsonpath='{.items[*].metadata.name}' | tr ' ' '\n' | grep -v -x -F "$leader")
  expect "the leader $leader is one of the operator pods; the other is $others" [ -n "$leader" -a -n "$others" ]
  sleep 3
  expect "still Draining, $victim still there" sh -c "[ \"\$(kubectl get gw $gw -o jsonpath='{.status.phase}')\" = Draining ] && kubectl get pods -l app=gpu-work -o jsonpath='{.items[*].metadata.uid}' | grep -qw '$victim_uid'"
  expect "the leader pod $leader is deleted" k -n $NS delete pod "$leader" --wait=false
  expect "another operator pod takes the Lease" \
    wait_until 120 sh -c "h=\$(kubectl -n $NS get lease unwedge-operator -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$h\" ] && [ \"\$h\" != '$leader' ]"
  local new; new=$(k -n $NS get lease unwedge-operator -o jsonpath='{.spec.holderIdentity}')
  echo "  new leader: $new (the standby was: $others)"
  expect "the new leader is the standby replica" [ "$new" = "$others" ]
  expect "the budget is lifted" k delete pdb gpu-work
  expect "the new leader finishes: the GpuWedge reaches Recovered" wait_phase $gw Recovered 300
  only_victim_gone "$victim_uid" "$before"
  expect "bind of $bdf journaled exactly once more" [ "$(journal_count /bind $bdf)" = $((binds + 1)) ]
  expect "the node is schedulable again" wait_until 60 node_clean
  expect "operator 2/2 Ready again" \
    wait_until 120 sh -c "[ \"\$(kubectl -n $NS get deploy $RELEASE-operator -o jsonpath='{.status.readyReplicas}')\" = 2 ]"
  expect "the Deployment is 8/8 again" sh -c "kubectl rollout status deploy/gpu-work --timeout=120s >/dev/null"
  gpu_work_down
}

# Objects of unwedge's in the cluster, one kind/namespace/name a line. Not counted: the CRDs and
# what they keep (GpuWedge records, the kept default policy, the CRD-made APIService), events,
# kind's own node objects, and what every namespace has.
leftovers() {
  local kinds
  kinds=$(k api-resources --verbs=list -o name | grep -v -x -e events -e events.events.k8s.io | paste -sd, -)
  k get "$kinds" -A -o json 2>/dev/null | jq -r '.items[]
      | select((.metadata.labels["app.kubernetes.io/instance"] == "unwedge")
               or (.metadata.name | test("unwedge"))
               or (.metadata.namespace == "unwedge-system"))
      | select(.kind != "CustomResourceDefinition" and .kind != "GpuWedge" and .kind != "Namespace")
      | select(.kind != "RecoveryPolicy" or .metadata.name != "default")
      | select(.kind != "APIService" or .metadata.name != "v1alpha1.unwedge.io")
      | select((.metadata.name | startswith("'"$CLUSTER_NAME"'-control-plane")) | not)
      | select(.metadata.namespace != "kube-system" and .metadata.namespace != "kube-node-lease")
      | select(.kind != "ConfigMap" or .metadata.name != "kube-root-ca.crt")
      | select(.kind != "ServiceAccount" or .metadata.name != "default")
      | "\(.kind)/\(.metadata.namespace // "-")/\(.metadata.name)"'
}
no_leftovers() { [ -z "$(leftovers)" ]; }

# helm upgrade with changed values rolls the agent and operator; helm uninstall leaves nothing of
# unwedge's but the CRDs (and the GpuWedge records they hold), and no node cordoned.
s_helm_upgrade_uninstall() {
  local out rev
  rev=$("$HELM" status $RELEASE -n $NS | sed -n 's/^REVISION: //p')
  out=$("$HELM" upgrade $RELEASE "${CHART[@]}" -n $NS "${HELM_SET[@]}" \
    --set agent.settle=5s --set operator.logFormat=text --wait --timeout 3m 2>&1) || { echo "$out"; return 1; }
  expect "helm reports revision $((rev + 1)) deployed" sh -c "'$HELM' status $RELEASE -n $NS | grep -q '^REVISION: $((rev + 1))$'"
  expect "the agent DaemonSet runs with --settle=5s, 1 pod Ready" \
    wait_until 120 sh -c "kubectl -n $NS get pod -l app.kubernetes.io/component=agent -o jsonpath='{.items[*].spec.containers[0].args}' | grep -q -e '--settle=5s' && [ \"\$(kubectl -n $NS get ds $RELEASE-agent -o jsonpath='{.status.updatedNumberScheduled}/{.status.numberReady}')\" = 1/1 ]"
  expect "the operator runs with --log-format=text, 2/2 Ready" \
    wait_until 180 sh -c "[ \"\$(kubectl -n $NS get deploy $RELEASE-operator -o jsonpath='{.status.updatedReplicas}/{.status.readyReplicas}/{.status.replicas}')\" = 2/2/2 ] && kubectl -n $NS get deploy $RELEASE-operator -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q -e '--log-format=text'"
  expect "kubectl get gw still works" k get gw
  out=$("$HELM" uninstall $RELEASE -n $NS --wait --timeout 3m 2>&1) || { echo "$out"; return 1; }
  echo "$out" | sed 's/^/  helm: /'
  expect "no pods left in $NS" wait_until 120 sh -c "[ -z \"\$(kubectl -n $NS get pods -o name)\" ]"
  # The garbage collector deletes what the uninstall's objects own (the operator's Lease is owned
  # by its Deployment) after them: give it a minute.
  wait_until 60 no_leftovers || true
  local left
  left=$(leftovers)
  expect "nothing of unwedge's is left but the CRDs (left: ${left:-nothing})" [ -z "$left" ]
  expect "the CRDs stay" sh -c "kubectl get crd -o name | grep -q 'unwedge.io'"
  expect "no node is cordoned" sh -c "[ -z \"\$(kubectl get nodes -o jsonpath='{.items[*].spec.unschedulable}')\" ]"
  expect "no node carries unwedge.io/cordoned-by" \
    sh -c "! kubectl get nodes -o jsonpath='{.items[*].metadata.annotations}' | grep -q cordoned-by"
}


# --- prerequisites ------------------------------------------------------------------------
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${SCENARIOS[@]}")
# Every other scenario runs after the README's install and first run (which ends in automatic mode).
for s in first_run helm_install; do
  [[ " ${selected[*]} " == *" $s "* ]] || selected=("$s" "${selected[@]}")
done

"$KIND_DIR/build-node-image.sh" >&2
lap "node image (cached or built)"
"$E2E_DIR/cluster/build-binaries.sh" helm >/dev/null
HELM=$CP_BIN/helm
KREW=$(bash "$ROOT/tools/krew/build.sh" | tail -1)
kind_path
"$KIND_DIR/fake-device-plugin/build.sh" >/dev/null
lap "fake device plugin image"
# Built every run (cargo rebuilds what changed), like the release below: never a stale binary.
( cd "$ROOT" && cargo build -q -p uevent-inject --profile dist --target $MUSL --bin uevent-inject ) >&2 \
  || die "uevent-inject could not be built"
lap "uevent-inject"

export KUBECONFIG
KUBECONFIG=$("$KIND_DIR/cluster.sh" create)
lap "create cluster"
# The test scaffolding's image only; unwedge's come from the registry.
"$KIND_DIR/cluster.sh" load "$PLUGIN_IMAGE"
lap "load the fake device plugin image"
REGISTRY=$("$KIND_DIR/registry.sh" start)
"$KIND_DIR/cluster.sh" trust-registry "$REGISTRY"
lap "registry"
# What `make release` does, into this registry: binaries (cargo rebuilds what changed), images,
# plugin archives and krew manifest, chart; pushed, digests checked.
UNWEDGE_OUT=$RUN/release "$ROOT/tools/release.sh" --registry "$REGISTRY" --plain-http | sed 's/^/  release| /'
. "$RUN/release/release.env"
[ -n "$AGENT_DIGEST" ] && [ -n "$OPERATOR_DIGEST" ] && [ -n "$CHART_DIGEST" ] || die "the release step printed no digests"
# The manifest check must be able to fail: a manifest naming a wrong sha256 is refused.
sed 's/^\(    sha256: \).*/\1'"$(printf '0%.0s' $(seq 64))"'/' "$RUN/release/krew/unwedge.yaml" >"$RUN/release/krew/wrong.yaml"
if bash "$ROOT/tools/krew-check.sh" "$RUN/release/krew/wrong.yaml" "$RUN/release" >/dev/null 2>&1; then
  die "tools/krew-check.sh accepted a krew manifest with a wrong sha256"
fi
chart_flags
lap "release pushed to the registry"
k apply -f "$KIND_DIR/manifests/fake-device-plugin.yaml" >/dev/null
k -n kube-system rollout status ds/fake-device-plugin --timeout=120s >/dev/null
wait_until 60 sh -c "[ \"\$(kubectl get node $NODE -o jsonpath='{.status.allocatable.unwedge\\.io/fake-gpu}')\" = 8 ]" \
  || die "the node does not offer 8 unwedge.io/fake-gpu"
docker cp "$KIND_WORK/fake-device-plugin/podresources-list" "$NODE:/usr/local/bin/podresources-list"
docker cp "${CARGO_TARGET_DIR:-$ROOT/target}/$MUSL/dist/uevent-inject" "$NODE:/usr/local/bin/uevent-inject"
k label node "$NODE" unwedge.io/gpu=true >/dev/null
lap "fake device plugin ready"

for s in "${selected[@]}"; do
  echo "=== scenario $s"
  if ! declare -F "s_$s" >/dev/null; then echo "  no such scenario: $s"; RESULT[$s]=FAIL; failed=1; continue; fi
  if [ "$s" != helm_install ] && [ "${RESULT[helm_install]:-}" != PASS ]; then
    echo "  skipped: helm_install did not pass"; RESULT[$s]="FAIL (helm_install failed)"; failed=1; continue
  fi
  if [ "$s" != helm_install ] && [ "$s" != first_run ] && [ "${RESULT[first_run]:-}" != PASS ]; then
    echo "  skipped: first_run did not pass"; RESULT[$s]="FAIL (first_run failed)"; failed=1; continue
  fi
  if [ "$s" = helm_upgrade_uninstall ]; then echo "--- kubectl get pods -A (before the uninstall)"; k get pods -A -o wide; fi
  if ( "s_$s" ); then RESULT[$s]=PASS; else RESULT[$s]=FAIL; failed=1; fi
  lap "scenario $s"
done
echo "--- kubectl get pods -A"
k get pods -A -o wide
