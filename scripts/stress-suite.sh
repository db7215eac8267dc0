#!/usr/bin/env bash
# The whole suite N times in a row while stress-ng keeps every core busy;
# stops at the first failing run.  Prints each run's pytest summary line.
#   ./scripts/stress-suite.sh [N=5] [pytest args...]
# Needs stress-ng (Debian: apt-get install stress-ng); set STRESS_CPUS to
# change the number of busy workers (default: the number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
shift || true
cpus=${STRESS_CPUS:-$(nproc)}
command -v stress-ng >/dev/null || { echo "stress-ng is not installed" >&2; exit 2; }

logdir=$(mktemp -d "${TMPDIR:-/tmp}/mw-stress.XXXXXX")
stress-ng --cpu "$cpus" --timeout 0 --quiet &
stress=$!
trap 'kill "$stress" 2>/dev/null || true; wait "$stress" 2>/dev/null || true' EXIT
echo ">> stress-ng --cpu $cpus (pid $stress); logs in $logdir"

for i in $(seq 1 "$runs"); do
  log="$logdir/run-$i.log"
  start=$(date +%s)
  set +e
  ./scripts/test.sh -q -p no:cacheprovider "$@" >"$log" 2>&1
  rc=$?
  set -e
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^=+ .*(passed|failed|error).* =+$' "$log" | tail -1)
  echo "run $i/$runs: rc=$rc in $(( $(date +%s) - start ))s: ${summary:-no summary (see $log)}"
  if [ "$rc" -ne 0 ]; then
    grep -E '^(FAILED|ERROR) ' "$log" || tail -40 "$log"
    echo "run $i failed; full log: $log" >&2
    exit "$rc"
  fi
done
echo ">> $runs runs in a row passed under stress-ng --cpu $cpus"
