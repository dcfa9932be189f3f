#!/usr/bin/env bash
# Runs test jobs in parallel lanes: each job is one e2e test binary (one file of e2e/tests/, or
# the e2e crate's own unit tests) or one bench short mode, with its own control plane on free
# ports, so jobs share nothing but the cores. Jobs start longest first, by the durations in
# tools/lanes-durations.tsv (measured on the 2-core reference machine; a job not listed there
# starts first); each job's output is kept in a log and printed whole when the job ends, with its
# duration, so lanes do not interleave. LANES_UPDATE=1 writes this run's durations of the jobs
# that passed into that file.
#
#   tools/lanes.sh e2e            every file in e2e/tests/
#   tools/lanes.sh bench          the benches' short modes (storm, chaos, time-to-cordon)
#   tools/lanes.sh e2e bench      both, in one pool
#
# LANES (default 2: the reference machine's cores; most of a job's time is spent waiting on the
# API server, a kill or a recovery, so two control planes fit on two cores). LANES=1 runs one job
# at a time, in the same order. Exit status: 0 when every job passed; else 1, after every job
# ran, with the failed jobs' names (their logs were printed above).
#
# Needs the binaries built first (`make bins`: cargo holds its lock while tests run, and each
# lane's `cargo test` must find the test binaries built; `make test-build` builds them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
lanes=${LANES:-2}
cargo=${CARGO:-cargo}
durations=$root/tools/lanes-durations.tsv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The test binaries are run directly, not through `cargo test`: concurrent `cargo test`s would
# queue on cargo's lock. As cargo does, each runs in its package's directory.
target_dir=$($cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
# jobs: "name<TAB>command" lines.
jobs=()
for group in "$@"; do
  case $group in
    e2e)
      while IFS=$'\t' read -r t exe; do
        jobs+=("e2e/$t	cd e2e && $exe --test-threads=1")
      done < <($cargo test -q -p e2e --no-run --message-format=json |
        jq -r 'select(.reason == "compiler-artifact" and .profile.test == true)
          | [(if .target.kind[0] == "test" then "" else .target.kind[0] + "-" end)
             + .target.name, .executable] | @tsv' | sort)
      ;;
    bench)
      jobs+=("bench/storm	$target_dir/debug/bench storm --short")
      jobs+=("bench/chaos	$target_dir/debug/bench chaos --short")
      jobs+=("bench/time-to-cordon	$target_dir/debug/bench time-to-cordon --short")
      ;;
    *) echo "lanes.sh: unknown group '$group' (e2e, bench)" >&2; exit 2 ;;
  esac
done
[ ${#jobs[@]} -gt 0 ] || { echo "lanes.sh: no jobs (give e2e and/or bench)" >&2; exit 2; }

# Longest first: last known seconds, unknown = 100000 (first), ties by name.
known() { awk -F'\t' -v n="$1" '$1 == n { s = $2 } END { print (s == "" ? 100000 : s) }' \
  "$durations"; }
ordered=$(for j in "${jobs[@]}"; do printf '%s\t%s\n' "$(known "${j%%	*}")" "$j"; done |
  sort -t$'\t' -k1,1nr -k2,2 | cut -f2-)

# One job: runs it, logs it, records name, status and seconds.
run_one() {
  local name=${1%%	*} cmd=${1#*	}
  local log="$work/${name//\//_}.log" t0=$SECONDS rc=0
  bash -c "$cmd" >"$log" 2>&1 || rc=$?
  local secs=$((SECONDS - t0))
  {
    flock 9
    echo "=== lane job $name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in ${secs}s"
    awk -v p="  $name| " '{ print p $0 }' "$log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >>"$work/results"
  } 9>"$work/lock"
}
export -f run_one
export work

started=$SECONDS
echo "lanes.sh: ${#jobs[@]} jobs in $lanes lanes, longest first"
printf '%s\n' "$ordered" | tr '\n' '\0' | xargs -0 -P "$lanes" -I{} bash -c 'run_one "$1"' _ {} || true

if [ "${LANES_UPDATE:-0}" = 1 ]; then
  { [ -f "$durations" ] && grep -v '^#' "$durations"; awk -F'\t' '$2 == 0 { print $1 "\t" $3 }' "$work/results"; } |
    awk -F'\t' '{ d[$1] = $2 } END { for (n in d) print n "\t" d[n] }' | sort >"$work/durations"
  { echo "# job<TAB>seconds: tools/lanes.sh starts the longest first (LANES_UPDATE=1 rewrites this)"
    cat "$work/durations"; } >"$durations"
fi

failed=$(awk -F'\t' '$2 != 0 { print $1 }' "$work/results")
ran=$(wc -l <"$work/results")
echo "lanes.sh: $ran of ${#jobs[@]} jobs ran in $((SECONDS - started))s; per job:"
sort -t$'\t' -k3,3nr "$work/results" | awk -F'\t' '{ printf "  %-32s %s %5ss\n", $1, ($2 == 0 ? "ok    " : "FAILED"), $3 }'
if [ "$ran" -ne ${#jobs[@]} ] || [ -n "$failed" ]; then
  echo "lanes.sh: failed: ${failed:-some jobs did not report}" >&2
  exit 1
fi
