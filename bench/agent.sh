#!/usr/bin/env bash
# The node agent's benchmark (issue 6's targets), on a three-member cluster on loopback.
#
#   pod-startup: one agent with the process runtime; PODS pods (`sleep 3600`) created for
#                its node by 8 clients, each timed from create to Running seen in a watch;
#                RUNS rounds on the same cluster (pods deleted between rounds).
#   agent-sim:   one agent with `--runtime fake --simulate-nodes SIM_NODES` (leases every
#                2 s); its CPU share and RSS over DURATION seconds once every node is Ready.
#
# Usage: bench/agent.sh       # about 2 minutes
#   RUNS=3 PODS=100 SIM_NODES=1000 DURATION=30 BASE_PORT=25090
#
# Results: bench/results/agent-<date>/results.jsonl and logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
PODS=${PODS:-100}
SIM_NODES=${SIM_NODES:-1000}
DURATION=${DURATION:-30}
BASE_PORT=${BASE_PORT:-25090}

out="bench/results/agent-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/logs"
work=$(mktemp -d)
cargo build --release --locked -p flotilla-cli -p flotilla-bench >&2
bin=target/release/flotilla
bench=target/release/flotilla-bench
PIDS=()

log() { echo "== $*" >&2; }
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    # Containers outlive their agent: stop the ones this run started (shims lead their groups).
    for p in $(pgrep -f "agent-shim --dir $work" 2>/dev/null || true); do kill -9 -- "-$p" 2>/dev/null || true; done
    cp "$work"/*.log "$out/logs/" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

initial=""
endpoints=""
for i in 1 2 3; do
    client=$((BASE_PORT + 2 * (i - 1)))
    initial+="${initial:+,}n$i=127.0.0.1:$((client + 1))"
    endpoints+="${endpoints:+,}127.0.0.1:$client"
done
for i in 1 2 3; do
    client=$((BASE_PORT + 2 * (i - 1)))
    "$bin" server --name "n$i" --data-dir "$work/n$i" \
        --client-addr "127.0.0.1:$client" --peer-addr "127.0.0.1:$((client + 1))" \
        --initial-cluster "$initial" 2>>"$work/n$i.log" &
    PIDS+=($!)
done
"$bench" --endpoints "$endpoints" health --wait 30 >&2

record() { tee -a "$out/results.jsonl"; }

"$bin" agent --servers "$endpoints" --node-name bench-node --data-dir "$work/agent" \
    2>>"$work/agent.log" &
PIDS+=($!)
# Rounds start once the node is registered (agent start-up is not pod start-up).
for _ in $(seq 1 300); do
    "$bin" get node bench-node --server "$endpoints" >/dev/null 2>&1 && break
    sleep 0.1
done
for round in $(seq 1 "$RUNS"); do
    log "round $round: pod-startup, $PODS pods on one agent (process runtime)"
    "$bench" --endpoints "$endpoints" --json pod-startup --node bench-node --pods "$PODS" | record
done

log "agent-sim: $SIM_NODES simulated nodes, measured for $DURATION s"
"$bin" agent --servers "$endpoints" --node-name sim --runtime fake \
    --simulate-nodes "$SIM_NODES" --data-dir "$work/sim" 2>>"$work/sim.log" &
sim=$!
PIDS+=($sim)
"$bench" --endpoints "$endpoints" --json agent-sim --agent-pid "$sim" --nodes "$SIM_NODES" \
    --prefix sim- --duration "$DURATION" | record
log "results in $out/results.jsonl"
