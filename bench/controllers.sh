#!/usr/bin/env bash
# The controllers' benchmark (issue 5's targets): a three-member cluster on loopback with
# the controllers and scheduler on its leader, simulated nodes (Node objects, Leases renewed,
# a stand-in kubelet that reports their pods Running and Ready), driven by flotilla-bench.
#
# Usage: bench/controllers.sh             # about 5 minutes on 2 cores
#   RUNS=3            rounds of ctrl-scale and ctrl-node-loss (each on a fresh cluster)
#   FAILOVER_RUNS=5   rounds of ctrl-failover (each on a fresh cluster)
#   NODES=500 REPLICAS=5000   ctrl-scale's size
#   BASE_PORT=24990   members use BASE_PORT..+5 (client, peer pairs)
#
# Results: bench/results/controllers-<date>/results.jsonl and logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
FAILOVER_RUNS=${FAILOVER_RUNS:-5}
NODES=${NODES:-500}
REPLICAS=${REPLICAS:-5000}
BASE_PORT=${BASE_PORT:-24990}

out="bench/results/controllers-$(date +%Y%m%d-%H%M%S)"
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

start_cluster() {
    local i
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
    rm -rf "$work"/n*
    for i in 1 2 3; do
        local client=$((BASE_PORT + 2 * (i - 1)))
        "$bin" server --name "n$i" --data-dir "$work/n$i" \
            --client-addr "127.0.0.1:$client" --peer-addr "127.0.0.1:$((client + 1))" \
            --initial-cluster "$initial" 2>>"$work/n$i.log" &
        PIDS+=($!)
    done
    "$bench" --endpoints "$endpoints" health --wait 30 >&2
}

record() { tee -a "$out/results.jsonl"; }

for round in $(seq 1 "$RUNS"); do
    log "round $round: ctrl-scale, $NODES nodes, 0 → $REPLICAS replicas, then a rolling update"
    start_cluster
    "$bench" --endpoints "$endpoints" --json ctrl-scale --nodes "$NODES" --replicas "$REPLICAS" | record
    log "round $round: ctrl-node-loss"
    start_cluster
    "$bench" --endpoints "$endpoints" --json ctrl-node-loss | record
done
for round in $(seq 1 "$FAILOVER_RUNS"); do
    log "failover round $round"
    start_cluster
    pids=$(IFS=,; echo "${PIDS[*]}")
    "$bench" --endpoints "$endpoints" --json ctrl-failover --member-pids "$pids" | record
done
log "results in $out/results.jsonl"
