#!/usr/bin/env bash
# The robustness probe's read storm (issue 42): three members (release build), 50,000 keys of
# 1 KB, then four clients reading the whole key space (`etcdctl get --prefix`) from the
# leader as fast as they can for STORM seconds. Prints each member's RSS before, at its peak
# during and after the storm, the leader and term before and after, and the reads done.
#
#   bench/read-storm.sh            # KEYS=50000 VALUE=1000 READERS=4 STORM=6
#
# Loopback only; every process it starts is killed when it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flotilla}
BENCH=${BENCH:-target/release/flotilla-bench}
KEYS=${KEYS:-50000}
VALUE=${VALUE:-1000}
READERS=${READERS:-4}
STORM=${STORM:-6}
BASE=${BASE:-27400}
OUT=$(mktemp -d /tmp/flotilla-read-storm.XXXX)
[ -x "$BIN" ] && [ -x "$BENCH" ] || cargo build --release --locked -q -p flotilla-cli -p flotilla-bench
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$OUT"
}
trap cleanup EXIT
. bench/lib.sh
cluster_addrs "$BASE"
MEMBERS=()
for i in 1 2 3; do
    c=$((BASE + 2 * (i - 1)))
    "$BIN" server --name "n$i" --data-dir "$OUT/n$i" --client-addr "127.0.0.1:$c" \
        --peer-addr "127.0.0.1:$((c + 1))" --initial-cluster "$initial" >"$OUT/n$i.log" 2>&1 &
    PIDS+=($!); MEMBERS+=($!)
done
for _ in $(seq 1 100); do
    ok=0
    for i in 1 2 3; do curl -sf "http://127.0.0.1:$((BASE + 2 * (i - 1)))/readyz" >/dev/null && ok=$((ok + 1)); done
    [ $ok = 3 ] && break
    sleep 0.3
done
"$BENCH" --endpoints "$endpoints" fill --keys "$KEYS" --total "$KEYS" --value-size "$VALUE" >/dev/null
export ETCDCTL_API=3
status() { etcdctl --endpoints "$endpoints" endpoint status -w json 2>/dev/null \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print(" ".join("%x@%d" % (x["Status"]["leader"], x["Status"]["header"]["raft_term"]) for x in s))'; }
rss() { for p in "${MEMBERS[@]}"; do awk '/VmRSS/{printf "%d ", $2/1024}' "/proc/$p/status"; done; }
leader_ep=$(etcdctl --endpoints "$endpoints" endpoint status -w json | python3 -c 'import json,sys; s=json.load(sys.stdin); print([x["Endpoint"] for x in s if x["Status"]["leader"]==x["Status"]["header"]["member_id"]][0])')
sleep 2
echo "before:  RSS MB $(rss)  leader@term per member: $(status)"
peak=(0 0 0)
end=$(( $(date +%s) + STORM ))
READS=()
for r in $(seq 1 "$READERS"); do
    ( n=0; while [ "$(date +%s)" -lt "$end" ]; do
        etcdctl --endpoints "$leader_ep" --command-timeout=30s get --prefix bench/ >/dev/null 2>&1 && n=$((n + 1))
      done; echo "$n" >"$OUT/reads.$r" ) &
    READS+=($!)
done
while [ "$(date +%s)" -lt "$end" ]; do
    i=0
    for m in $(rss); do [ "$m" -gt "${peak[$i]}" ] && peak[$i]=$m; i=$((i + 1)); done
    sleep 0.2
done
wait "${READS[@]}"
sleep 2
reads=$(cat "$OUT"/reads.* | paste -sd+ | bc)
echo "peak:    RSS MB ${peak[*]}"
echo "after:   RSS MB $(rss)  leader@term per member: $(status)"
echo "full-key-space reads completed: $reads in ${STORM} s by $READERS clients (leader $leader_ep)"
