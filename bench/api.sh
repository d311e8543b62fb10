#!/usr/bin/env bash
# The Flotilla API's benchmark (issue 3's targets): a three-member cluster on loopback,
# driven through the API by flotilla-bench.
#
# Usage: bench/api.sh                 # about 3 minutes on 2 cores
#   RUNS=3            rounds of api-create (each on a fresh cluster)
#   CREATES=20000     pods created per api-create round (64 clients)
#   LIST_PODS=10000   pods in the listed namespace; the members' RSS is read after it
#   WATCHERS=1000 CHANGES=100   api-watch: watches of one pod, changes to it (20/s)
#   BASE_PORT=24790   members use BASE_PORT..+5 (client, peer pairs)
#
# Results: bench/results/api-<date>/results.jsonl and logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
CREATES=${CREATES:-20000}
LIST_PODS=${LIST_PODS:-10000}
WATCHERS=${WATCHERS:-1000}
CHANGES=${CHANGES:-100}
BASE_PORT=${BASE_PORT:-24790}

out="bench/results/api-$(date +%Y%m%d-%H%M%S)"
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

endpoints="127.0.0.1:$BASE_PORT,127.0.0.1:$((BASE_PORT + 2)),127.0.0.1:$((BASE_PORT + 4))"
initial="n1=127.0.0.1:$((BASE_PORT + 1)),n2=127.0.0.1:$((BASE_PORT + 3)),n3=127.0.0.1:$((BASE_PORT + 5))"

start_cluster() {
    local i
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
    rm -rf "$work"/n*
    for i in 1 2 3; do
        local client=$((BASE_PORT + 2 * (i - 1)))
        "$bin" server --name "n$i" --data-dir "$work/n$i" \
            --client-addr "127.0.0.1:$client" --peer-addr "127.0.0.1:$((client + 1))" \
            --initial-cluster "$initial" --disable-scheduler 2>>"$work/n$i.log" &
        PIDS+=($!)
    done
    "$bench" --endpoints "$endpoints" health --wait 30 >&2
}

record() { tee -a "$out/results.jsonl"; }

for round in $(seq 1 "$RUNS"); do
    log "round $round: api-create, $CREATES pods, 64 clients"
    start_cluster
    "$bench" --endpoints "$endpoints" --json api-create --clients 64 --total "$CREATES" | record
done

log "api-list: $LIST_PODS pods"
start_cluster
"$bench" --endpoints "$endpoints" --json api-list --pods "$LIST_PODS" --runs 20 | record
rss=0
for p in "${PIDS[@]}"; do
    r=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
    if [ "$r" -gt "$rss" ]; then rss=$r; fi
done
echo "{\"bench\":\"api-rss\",\"pods\":$LIST_PODS,\"max_member_rss_mib\":$((rss / 1024))}" | record

log "api-watch: $WATCHERS watchers, $CHANGES changes"
"$bench" --endpoints "$endpoints" --json api-watch --watchers "$WATCHERS" --changes "$CHANGES" | record
log "results in $out/results.jsonl"
