#!/usr/bin/env bash
# Issue 43's election-timeout measurement: for each election timeout, a fresh three-member
# cluster (release build) is
#   1. run at 100% CPU: HOGS busy loops (`yes`, twice the cores by default) beside a writer
#      putting for BUSY seconds; the leader changes are counted (the highest term after
#      minus before: with PreVote a term rises only when a member campaigns) and the writer's
#      longest gap between acknowledged puts is kept;
#   2. failed over: the hogs stop, the writer puts again, and 3 s later the leader is killed
#      with -9; the writer's longest gap is the failover time.
# Rounds alternate the order of the timeouts. Prints one line per run and the medians.
#
#   bench/election-timeout.sh      # TIMEOUTS="200 500 1000" ROUNDS=3 BUSY=20 HOGS=2×cores
#
# Loopback only; every process it starts is killed when it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flotilla}
BENCH=${BENCH:-target/release/flotilla-bench}
TIMEOUTS=${TIMEOUTS:-"200 500 1000"}
ROUNDS=${ROUNDS:-3}
BUSY=${BUSY:-20}
HOGS=${HOGS:-$((2 * $(nproc)))}
BASE=${BASE:-27500}
OUT=$(mktemp -d /tmp/flotilla-election.XXXX)
[ -x "$BIN" ] && [ -x "$BENCH" ] || cargo build --release --locked -q -p flotilla-cli -p flotilla-bench
export ETCDCTL_API=3
PIDS=()
HOG_PIDS=()
cleanup() {
    for p in "${HOG_PIDS[@]}" "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    for p in "${HOG_PIDS[@]}" "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$OUT"
}
trap cleanup EXIT
. bench/lib.sh
cluster_addrs "$BASE"

# max_term: the highest Raft term any reachable member reports.
max_term() {
    etcdctl --endpoints "$endpoints" --command-timeout=5s endpoint status -w json 2>/dev/null \
        | python3 -c 'import json,sys; print(max(x["Status"].get("raft_term") or x["Status"]["header"].get("raft_term", 0) for x in json.load(sys.stdin)))'
}
gap() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["max_gap_ms"])' "$1"; }

# run T: one measurement with election timeout T; prints "T elections busy_gap failover_gap".
run() {
    local t=$1 i c before after busy fail leader victim
    rm -rf "$OUT/n1" "$OUT/n2" "$OUT/n3"
    PIDS=()
    for i in 1 2 3; do
        c=$((BASE + 2 * (i - 1)))
        "$BIN" server --name "n$i" --data-dir "$OUT/n$i" --client-addr "127.0.0.1:$c" \
            --peer-addr "127.0.0.1:$((c + 1))" --initial-cluster "$initial" \
            --election-timeout "$t" >"$OUT/n$i.log" 2>&1 &
        PIDS+=($!)
    done
    "$BENCH" --endpoints "$endpoints" health --wait 30 >/dev/null || { echo "$t: no healthy cluster" >&2; return 1; }
    sleep 2
    before=$(max_term)
    HOG_PIDS=()
    for i in $(seq 1 "$HOGS"); do yes >/dev/null & HOG_PIDS+=($!); done
    "$BENCH" --json --endpoints "$endpoints" unavailability --duration "$BUSY" \
        --timeout-ms 1000 --interval-ms 10 >"$OUT/busy.json" 2>/dev/null
    after=$(max_term)
    for p in "${HOG_PIDS[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    HOG_PIDS=()
    busy=$(gap "$OUT/busy.json")
    "$BENCH" --endpoints "$endpoints" health --wait 30 >/dev/null
    "$BENCH" --json --endpoints "$endpoints" unavailability --duration 8 \
        --timeout-ms 200 --interval-ms 10 >"$OUT/fail.json" 2>/dev/null &
    local writer=$!
    sleep 3
    leader=$("$BENCH" --endpoints "$endpoints" leader)
    victim=$(( (${leader##*:} - BASE) / 2 ))
    kill -9 "${PIDS[$victim]}"
    wait "${PIDS[$victim]}" 2>/dev/null
    wait "$writer"
    fail=$(gap "$OUT/fail.json")
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    PIDS=()
    echo "$t $((after - before)) $busy $fail"
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, $HOGS hogs, ${BUSY}s at 100% CPU; $(git rev-parse --short HEAD)"
echo "# timeout_ms elections_at_100%cpu longest_gap_at_100%cpu_ms failover_ms"
for r in $(seq 1 "$ROUNDS"); do
    order=$TIMEOUTS
    [ $((r % 2)) = 0 ] && order=$(echo "$TIMEOUTS" | tr ' ' '\n' | tac | tr '\n' ' ')
    for t in $order; do run "$t" | tee -a "$OUT/results"; done
done
echo "# medians: timeout_ms elections longest_gap_ms failover_ms"
python3 - "$OUT/results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    t, *v = map(int, line.split())
    rows.setdefault(t, []).append(v)
for t in sorted(rows):
    cols = list(zip(*rows[t]))
    print(t, *(statistics.median(c) for c in cols), f"({len(rows[t])} runs)")
EOF
