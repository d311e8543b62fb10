#!/usr/bin/env bash
# The density run of issue 43: three members (release build), fake agents simulating
# AGENTS x NODES_PER_AGENT nodes, then DEPLOYS Deployments of REPLICAS replicas applied one
# after another; every member's /metrics sampled every 2 s. After AGENT_SECS the agents stop
# (the load eases) and sampling goes on for DURATION s. Prints: pods bound, leader changes,
# the longest stretch without a commit, and how long after the agents stopped a write commits.
#
#   bench/density.sh                                   # 5 x 1,000 nodes, 10 x 3,000 replicas
#   AGENTS=2 NODES_PER_AGENT=500 DEPLOYS=2 REPLICAS=1000 bench/density.sh   # a quick look
#
# Loopback only; every process it starts is killed when it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flotilla}
AGENTS=${AGENTS:-5}
NODES_PER_AGENT=${NODES_PER_AGENT:-1000}
DEPLOYS=${DEPLOYS:-10}
REPLICAS=${REPLICAS:-3000}
AGENT_SECS=${AGENT_SECS:-180}
DURATION=${DURATION:-40}
BASE=${BASE:-27300}
OUT=${OUT:-$(mktemp -d /tmp/flotilla-density.XXXX)}
[ -x "$BIN" ] || cargo build --release --locked -q -p flotilla-cli
mkdir -p "$OUT"
echo "density run: $AGENTS agents x $NODES_PER_AGENT nodes, $DEPLOYS x $REPLICAS replicas; output in $OUT"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. bench/lib.sh
cluster_addrs "$BASE"
for i in 1 2 3; do
    c=$((BASE + 2 * (i - 1)))
    "$BIN" server --name "n$i" --data-dir "$OUT/n$i" \
        --client-addr "127.0.0.1:$c" --peer-addr "127.0.0.1:$((c + 1))" \
        --initial-cluster "$initial" >"$OUT/n$i.log" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 1 100); do
    ok=0
    for i in 1 2 3; do
        curl -sf "http://127.0.0.1:$((BASE + 2 * (i - 1)))/readyz" >/dev/null && ok=$((ok + 1))
    done
    [ $ok = 3 ] && break
    sleep 0.3
done

metric() { awk -v m="$1" '$1 == m { print $2 }'; }
T0=$(date +%s)
sample() {
    while true; do
        local line="$(( $(date +%s) - T0 ))"
        for i in 1 2 3; do
            m=$(curl -s -m 1 "http://127.0.0.1:$((BASE + 2 * (i - 1)))/metrics" 2>/dev/null)
            line+=" $(echo "$m" | metric flotilla_raft_term):$(echo "$m" | metric flotilla_raft_commit_index):$(echo "$m" | metric flotilla_raft_leader_changes_total)"
        done
        echo "$line"
        sleep 2
    done
}
sample >"$OUT/samples.txt" 2>&1 &
PIDS+=($!)

AGENT_PIDS=()
for a in $(seq 1 "$AGENTS"); do
    "$BIN" agent --servers "$endpoints" --node-name "sim$a" --runtime fake \
        --simulate-nodes "$NODES_PER_AGENT" --data-dir "$OUT/agent$a" >"$OUT/agent$a.log" 2>&1 &
    PIDS+=($!)
    AGENT_PIDS+=($!)
done
sleep "${SETTLE:-20}"
for d in $(seq 1 "$DEPLOYS"); do
    cat >"$OUT/d$d.yaml" <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: d$d, labels: {app: d$d}}
spec:
  replicas: $REPLICAS
  selector: {matchLabels: {app: d$d}}
  template:
    metadata: {labels: {app: d$d}}
    spec:
      containers:
      - name: c
        command: ["sleep", "3600"]
        resources: {requests: {cpu: 1m, memory: 1Mi}}
YAML
    timeout 30 "$BIN" apply -f "$OUT/d$d.yaml" --server "$endpoints" >>"$OUT/apply.log" 2>&1
done
while [ $(( $(date +%s) - T0 )) -lt "$AGENT_SECS" ]; do sleep 1; done
bound=$(timeout 60 "$BIN" get pods -A --server "$endpoints" -o name --field-selector status.phase=Running 2>/dev/null | wc -l)
kill "${AGENT_PIDS[@]}" 2>/dev/null
STOPPED=$(( $(date +%s) - T0 ))
# How long until a write commits once the load eases.
back=none
for _ in $(seq 1 "$DURATION"); do
    if timeout 5 "$BIN" scale deployment d1 --replicas "$REPLICAS" --server "$endpoints" >/dev/null 2>&1 \
        && printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: after-load}\n' | timeout 5 "$BIN" apply -f - --server "$endpoints" >/dev/null 2>&1; then
        back=$(( $(date +%s) - T0 - STOPPED ))
        break
    fi
    sleep 1
done
sleep 4
python3 - "$OUT/samples.txt" "$STOPPED" "$bound" "$back" <<'PY'
import sys
rows = []
for line in open(sys.argv[1]):
    parts = line.split()
    try:
        t = int(parts[0])
        vals = [tuple(int(x or 0) for x in p.split(":")) for p in parts[1:]]
    except (ValueError, IndexError):
        continue
    if vals:
        rows.append((t, max(v[1] for v in vals), max(v[0] for v in vals), max(v[2] for v in vals)))
stopped, bound, back = int(sys.argv[2]), sys.argv[3], sys.argv[4]
stall, start, last = (0, 0, 0), rows[0][0], rows[0][1]
for t, c, _, _ in rows:
    if c > last:
        stall = max(stall, (t - start, start, t))
        start, last = t, c
stall = max(stall, (rows[-1][0] - start, start, rows[-1][0]))
print(f"pods running when the agents stopped (t={stopped} s): {bound}")
print(f"commit index {rows[0][1]} -> {rows[-1][1]}; highest term {rows[-1][2]}; leader changes seen (most by one member) {rows[-1][3]}")
print(f"longest stretch without a commit: {stall[0]} s (t={stall[1]}..{stall[2]})")
print(f"a write committed {back} s after the agents stopped")
PY
