#!/usr/bin/env bash
# The scheduler's benchmark (issue 4's targets): a three-member cluster on loopback with the
# scheduler on its leader; flotilla-bench registers N nodes (Ready, Leases renewed; no
# agents) and creates PODS pods, measuring first create to last pod bound and each pod's
# create-to-bound latency, plus the members' CPU seconds.
#
# Usage: bench/sched.sh                    # about 5 minutes on 2 cores
#   RUNS=3              rounds per node count (each on a fresh cluster)
#   NODES="100 1000 5000"
#   PODS=10000          pods per round, created by 64 clients
#   LEASE_INTERVAL=10   seconds between renewals of each node's Lease
#   GRACE=40s           the members' --node-monitor-grace (with LEASE_INTERVAL: Kubernetes'
#                       defaults for node leases; Flotilla's own are 2 s and 8 s)
#   BASE_PORT=24890     members use BASE_PORT..+5 (client, peer pairs)
#
# Results: bench/results/sched-<date>/results.jsonl and logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
NODES=${NODES:-"100 1000 5000"}
PODS=${PODS:-10000}
LEASE_INTERVAL=${LEASE_INTERVAL:-10}
GRACE=${GRACE:-40s}
BASE_PORT=${BASE_PORT:-24890}

out="bench/results/sched-$(date +%Y%m%d-%H%M%S)"
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
            --initial-cluster "$initial" --node-monitor-grace "$GRACE" 2>>"$work/n$i.log" &
        PIDS+=($!)
    done
    "$bench" --endpoints "$endpoints" health --wait 30 >&2
}

for round in $(seq 1 "$RUNS"); do
    for nodes in $NODES; do
        log "round $round: $nodes nodes, $PODS pods"
        start_cluster
        pids=$(IFS=,; echo "${PIDS[*]}")
        "$bench" --endpoints "$endpoints" --json sched --nodes "$nodes" --pods "$PODS" \
            --lease-interval "$LEASE_INTERVAL" --member-pids "$pids" \
            | tee -a "$out/results.jsonl"
    done
done
log "results in $out/results.jsonl"
