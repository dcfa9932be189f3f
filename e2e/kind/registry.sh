#!/usr/bin/env bash
# The kind tier's OCI registry: CNCF distribution (tools/registry/build.sh, cached), a process
# of this machine listening on the kind network's gateway address only (reachable from the kind
# node and from here, from nowhere else) on a free port, storing under $RUN/registry. The node's
# containerd pulls from it over plain HTTP once `cluster.sh trust-registry HOST:PORT` ran.
#
#   e2e/kind/registry.sh start   prints HOST:PORT (needs the kind network: after cluster.sh create)
#   e2e/kind/registry.sh stop    stops the one this clone started (its pid file); always succeeds
set -euo pipefail
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
RUN=$KIND_WORK/run-$CLUSTER_NAME
DIR=$RUN/registry
PIDFILE=$RUN/registry.pid

start() {
  local bin gw port pid i
  bin=$(bash "$E2E_DIR/../tools/registry/build.sh" | tail -1)
  gw=$(docker network inspect kind --format '{{range .IPAM.Config}}{{.Gateway}} {{end}}' 2>/dev/null |
    tr ' ' '\n' | grep -m1 -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' || true)
  [ -n "$gw" ] || die "the docker network 'kind' has no IPv4 gateway (create the cluster first)"
  stop
  mkdir -p "$DIR/storage"
  # Ports below the kernel's ephemeral range, so no outgoing connection holds the one chosen.
  for _ in $(seq 1 20); do
    port=$((20000 + RANDOM % 10000))
    [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || continue
    cat >"$DIR/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DIR/storage
  delete:
    enabled: true
http:
  addr: $gw:$port
  secret: $(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
EOF
    # No telemetry exporters: nothing to send traces or metrics to.
    OTEL_TRACES_EXPORTER=none OTEL_METRICS_EXPORTER=none OTEL_LOGS_EXPORTER=none \
      "$bin" serve "$DIR/config.yml" >"$DIR/registry.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    for i in $(seq 1 50); do
      if curl -fsS -o /dev/null "http://$gw:$port/v2/"; then
        log "registry (distribution) at $gw:$port, pid $pid, log $DIR/registry.log"
        echo "$gw:$port"
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    log "the registry did not answer on $gw:$port: $(tail -3 "$DIR/registry.log" | tr '\n' ' ')"
    stop
  done
  die "no registry could be started (see $DIR/registry.log)"
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  local pid; pid=$(cat "$PIDFILE")
  # Only that process, and only while it still is this registry (pids are reused).
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF " serve $DIR/config.yml"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop" ;;
esac
