#!/usr/bin/env bash
# Side-by-side benchmark: a three-member Flotilla cluster and a three-member etcd 3.4 (Debian
# etcd-server, default timings) on loopback, driven by the same load generator
# (flotilla-bench, a client generated from this repository's etcd .proto files).
#
# Usage: bench/run.sh            # everything; results in bench/results/<date>/
#   RUNS=3            rounds of the throughput/latency suite (systems interleaved per round)
#   FAILOVER_RUNS=5   leader kill -9 runs per system
#   SCALE=1           multiply operation counts (use 0.2 for a quick check)
#   SKIP_FILL=1       skip the 1,000,000-put disk and memory run
#   SKIP_IDLE=1       skip the idle-RSS run (100 MB of live data)
#   ONLY=flotilla|etcd  run one system only
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
FAILOVER_RUNS=${FAILOVER_RUNS:-5}
SCALE=${SCALE:-1}
ONLY=${ONLY:-}
out="bench/results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
results="$out/results.jsonl"

cargo build --release --locked -p flotilla-cli -p flotilla-bench >&2
FLOTILLA=$PWD/target/release/flotilla
BENCH=$PWD/target/release/flotilla-bench
if ! command -v etcd >/dev/null; then
    apt-get install -y -qq etcd-server >/dev/null
fi
# Debian starts a packaged etcd on the default ports; it is not ours.
systemctl stop etcd 2>/dev/null || true

work=$(mktemp -d)
declare -A PIDS
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

n() { python3 -c "print(max(1, int($1 * $SCALE)))"; }

# Ports: Flotilla clients 23790,23792,23794 (peers +1); etcd clients 24790,... (peers +1).
client_port() { local base=$1 i=$2; echo $((base + 2 * (i - 1))); }

start_member() {
    local sys=$1 i=$2 fresh=$3 base dir
    if [ "$sys" = flotilla ]; then base=23790; else base=24790; fi
    local cp; cp=$(client_port $base "$i")
    local pp=$((cp + 1))
    dir="$work/$sys/m$i"
    if [ "$fresh" = 1 ]; then rm -rf "$dir"; fi
    mkdir -p "$dir"
    if [ "$sys" = flotilla ]; then
        "$FLOTILLA" server --name "m$i" --data-dir "$dir/data" \
            --client-addr "127.0.0.1:$cp" --peer-addr "127.0.0.1:$pp" \
            --initial-cluster "m1=127.0.0.1:$((base + 1)),m2=127.0.0.1:$((base + 3)),m3=127.0.0.1:$((base + 5))" \
            >>"$dir/log" 2>&1 &
    else
        local state=new
        if [ -d "$dir/data/member" ]; then state=existing; fi
        etcd --name "m$i" --data-dir "$dir/data" \
            --listen-client-urls "http://127.0.0.1:$cp" --advertise-client-urls "http://127.0.0.1:$cp" \
            --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
            --initial-cluster "m1=http://127.0.0.1:$((base + 1)),m2=http://127.0.0.1:$((base + 3)),m3=http://127.0.0.1:$((base + 5))" \
            --initial-cluster-state "$state" --initial-cluster-token bench \
            >>"$dir/log" 2>&1 &
    fi
    PIDS[$sys$i]=$!
}

endpoints() {
    local base=23790
    if [ "$1" = etcd ]; then base=24790; fi
    echo "127.0.0.1:$base,127.0.0.1:$((base + 2)),127.0.0.1:$((base + 4))"
}

wait_healthy() {
    local sys=$1 deadline=$((SECONDS + 60))
    until "$BENCH" --endpoints "$(endpoints "$sys")" leader >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then echo "$sys did not elect a leader" >&2; exit 1; fi
        sleep 0.2
    done
    # Every member must answer too.
    for e in ${1:+$(endpoints "$sys" | tr , ' ')}; do
        until ETCDCTL_API=3 etcdctl --endpoints "$e" endpoint status >/dev/null 2>&1; do
            if [ $SECONDS -ge $deadline ]; then echo "$sys member $e is not healthy" >&2; exit 1; fi
            sleep 0.2
        done
    done
}

start_cluster() {
    local sys=$1
    for i in 1 2 3; do start_member "$sys" $i 1; done
    wait_healthy "$sys"
}

stop_cluster() {
    local sys=$1
    for i in 1 2 3; do
        kill "${PIDS[$sys$i]}" 2>/dev/null || true
        wait "${PIDS[$sys$i]}" 2>/dev/null || true
    done
}

record() { # sys round json...
    local sys=$1 round=$2
    shift 2
    python3 -c 'import json,sys; d=json.loads(sys.argv[3]); d["system"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' \
        "$sys" "$round" "$1" | tee -a "$results"
}

bench() { # sys round args...
    local sys=$1 round=$2
    shift 2
    record "$sys" "$round" "$("$BENCH" --json --endpoints "$(endpoints "$sys")" "$@" 2>>"$out/bench.log")"
}

suite() {
    local sys=$1 round=$2
    start_cluster "$sys"
    bench "$sys" "$round" put --clients 1 --total "$(n 3000)"
    bench "$sys" "$round" put --clients 16 --total "$(n 20000)"
    bench "$sys" "$round" put --clients 64 --total "$(n 40000)"
    bench "$sys" "$round" put --clients 256 --total "$(n 40000)"
    bench "$sys" "$round" range --clients 1 --total "$(n 5000)" --consistency l --prefill --key-space 1000
    bench "$sys" "$round" range --clients 64 --total "$(n 100000)" --consistency l --key-space 1000
    bench "$sys" "$round" range --clients 1 --total "$(n 5000)" --consistency s --key-space 1000
    bench "$sys" "$round" range --clients 64 --total "$(n 100000)" --consistency s --key-space 1000
    bench "$sys" "$round" watch-latency --watchers 1 --puts "$(n 1000)" --rate 200
    bench "$sys" "$round" watch-latency --watchers 1000 --puts "$(n 1000)" --rate 200
    stop_cluster "$sys"
}

failover() {
    local sys=$1 run=$2 eps leader victim
    start_cluster "$sys"
    eps=$(endpoints "$sys")
    "$BENCH" --json --endpoints "$eps" unavailability --duration 8 >"$work/unavail.json" 2>>"$out/bench.log" &
    local writer=$!
    sleep 3
    leader=$("$BENCH" --endpoints "$eps" leader)
    for i in 1 2 3; do
        local base=23790
        if [ "$sys" = etcd ]; then base=24790; fi
        if [ "$leader" = "127.0.0.1:$(client_port $base $i)" ]; then victim=$i; fi
    done
    kill -9 "${PIDS[$sys$victim]}"
    wait "$writer"
    record "$sys" "$run" "$(cat "$work/unavail.json")"
    stop_cluster "$sys"
}

# Records each member's data dir size and RSS under the name `$2`.
measure_members() {
    local sys=$1 label=$2 i rss size
    for i in 1 2 3; do
        rss=$(awk '/VmRSS/ {print $2}' "/proc/${PIDS[$sys$i]}/status")
        size=$(du -sb "$work/$sys/m$i/data" | cut -f1)
        record "$sys" 1 "{\"bench\":\"$label\",\"member\":$i,\"data_dir_bytes\":$size,\"rss_kib\":$rss}"
    done
}

systems="flotilla etcd"
if [ -n "$ONLY" ]; then systems=$ONLY; fi

for round in $(seq 1 "$RUNS"); do
    for sys in $systems; do suite "$sys" "$round"; done
done
for run in $(seq 1 "$FAILOVER_RUNS"); do
    for sys in $systems; do failover "$sys" "$run"; done
done

if [ "${SKIP_FILL:-0}" != 1 ]; then
    for sys in $systems; do
        start_cluster "$sys"
        bench "$sys" 1 fill --keys 10000 --total "$(n 1000000)" --clients 64
        sleep 10 # let automatic compaction run
        measure_members "$sys" disk
        stop_cluster "$sys"
    done
fi

if [ "${SKIP_IDLE:-0}" != 1 ]; then
    # RSS of idle members holding 100 MB of live data (100,000 keys of 1,000-byte values).
    for sys in $systems; do
        start_cluster "$sys"
        bench "$sys" 1 fill --keys 100000 --total 100000 --value-size 1000 --clients 64
        sleep 15
        measure_members "$sys" idle-100MB
        stop_cluster "$sys"
    done
fi

python3 bench/summarize.py "$results" | tee "$out/summary.md"
