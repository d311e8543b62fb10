#!/usr/bin/env bash
# One measurement on a fresh three-member cluster, for comparing builds (or Flotilla and etcd)
# in alternation: run it for each variant in turn, several times, and compare medians.
#
# Usage: bench/ab.sh FLOTILLA_BIN_DIR|etcd LABEL
#   MODE=put   (default) put at CLIENTS (64) clients, TOTAL (80000) puts of 256 bytes, after
#              2,000 not counted; prints throughput, p50/p99, the members' CPU per put (from
#              /proc/PID/stat) and their disk writes per put (/proc/PID/io write_bytes)
#   MODE=fill  TOTAL (1000000) puts over 10,000 keys at 64 clients; prints the members' data
#              dir sizes 10 s and 40 s after (and, for Flotilla, of db/ and log/ at 40 s), and
#              the size of a snapshot of the live state
#   WARM=2000 WARM_CLIENTS=$CLIENTS   puts not counted before a put run, and at how many
#              clients (a history written at 1 or 16 clients, as the full run's levels leave);
#              WARM may also list CLIENTS:PUTS[:KEYS] steps, as WARM="1:10000 16:40000" (run.sh's
#              levels); KEYS is the step's key space (by default the counted puts' own)
#   PERF_STAT=FILE  perf stat of the members' syscalls (PERF_EVENTS) during the counted puts
#   PERF=FILE  perf record of all members during the counted puts, into FILE (PERF_HZ=499;
#              PERF_ARGS="--call-graph dwarf,16384" for call graphs)
#   BENCH=target/release/flotilla-bench
# Example: for i in 1 2 3; do bench/ab.sh /tmp/old old; bench/ab.sh target/release new; done
set -euo pipefail
BIN=$1
LABEL=$2
MODE=${MODE:-put}
CLIENTS=${CLIENTS:-64}
BENCH=${BENCH:-target/release/flotilla-bench}
if [ "$MODE" = fill ]; then TOTAL=${TOTAL:-1000000}; else TOTAL=${TOTAL:-80000}; fi

work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
eps="http://127.0.0.1:$port,http://127.0.0.1:$((port + 2)),http://127.0.0.1:$((port + 4))"
cluster="n1=http://127.0.0.1:$((port + 1)),n2=http://127.0.0.1:$((port + 3)),n3=http://127.0.0.1:$((port + 5))"
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for i in 1 2 3; do
    c=$((port + 2 * (i - 1)))
    p=$((c + 1))
    if [ "$BIN" = etcd ]; then
        etcd --name "n$i" --data-dir "$work/n$i" \
            --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
            --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
            --initial-cluster "$cluster" --initial-cluster-state new >"$work/n$i.log" 2>&1 &
    else
        "$BIN/flotilla" server --name "n$i" --data-dir "$work/n$i" --client-addr "127.0.0.1:$c" \
            --peer-addr "127.0.0.1:$p" --initial-cluster "$cluster" >"$work/n$i.log" 2>&1 &
    fi
    pids+=($!)
done
"$BENCH" --endpoints "$eps" health --wait 60 >/dev/null

# Sum of one /proc field over the members: stat's utime+stime (ticks), or an io line.
cpu() { for p in "${pids[@]}"; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{s += $1} END {printf "%.0f\n", s}'; }
written() { for p in "${pids[@]}"; do awk '/^write_bytes/ {print $2}' "/proc/$p/io"; done | awk '{s += $1} END {printf "%.0f\n", s}'; }
sizes() { for i in 1 2 3; do du -sb "$work/n$i" | cut -f1; done | paste -sd' '; }
# Each member's db/ and log/ (Flotilla's key space and Raft log) as db+log bytes.
parts() { for i in 1 2 3; do echo "$(du -sb "$work/n$i/db" | cut -f1)+$(du -sb "$work/n$i/log" | cut -f1)"; done | paste -sd' '; }

if [ "$MODE" = fill ]; then
    cpu0=$(cpu)
    out=$("$BENCH" --endpoints "$eps" fill --keys 10000 --total "$TOTAL" --value-size 256 --clients 64 2>&1)
    cpu1=$(cpu)
    sleep 10
    at10=$(sizes)
    snap=-
    if [ "$BIN" != etcd ] && "$BIN/flotilla" snapshot save "$work/live.snap" --server "127.0.0.1:$port" >/dev/null 2>&1; then
        snap=$(stat -c %s "$work/live.snap")
    fi
    sleep 30
    echo "$LABEL $(grep -oE 'throughput=[0-9.]+' <<<"$out") cpu_us_per_put=$(((cpu1 - cpu0) * 10000 / TOTAL)) snapshot_bytes=$snap data_dir_bytes_10s=[$at10] data_dir_bytes_40s=[$(sizes)]$([ "$BIN" = etcd ] || echo " db+log_bytes_40s=[$(parts)]")"
else
    for w in ${WARM:-2000}; do
        IFS=: read -r a b k <<<"$w"
        if [ -n "$b" ]; then warm_clients=$a w=$b; else warm_clients=${WARM_CLIENTS:-$CLIENTS}; fi
        "$BENCH" --endpoints "$eps" put --clients "$warm_clients" --total "$w" --value-size 256 \
            ${k:+--key-space "$k"} >/dev/null
    done
    if [ -n "${PERF_STAT:-}" ]; then
        perf stat -x, -o "$PERF_STAT" -e "${PERF_EVENTS:-syscalls:sys_enter_openat,syscalls:sys_enter_unlink,syscalls:sys_enter_unlinkat,syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_sync_file_range,syscalls:sys_enter_pwrite64,syscalls:sys_enter_writev,syscalls:sys_enter_write,context-switches}" \
            -p "$(IFS=,; echo "${pids[*]}")" 2>/dev/null &
        statpid=$!
    fi
    if [ -n "${PERF:-}" ]; then
        perf record -q -F ${PERF_HZ:-499} ${PERF_ARGS:-} -o "$PERF" -p "$(IFS=,; echo "${pids[*]}")" 2>/dev/null &
        perfpid=$!
    fi
    cpu0=$(cpu)
    w0=$(written)
    out=$("$BENCH" --endpoints "$eps" put --clients "$CLIENTS" --total "$TOTAL" --value-size 256 2>&1)
    cpu1=$(cpu)
    w1=$(written)
    if [ -n "${PERF:-}" ]; then kill -INT "$perfpid"; wait "$perfpid" || true; fi
    if [ -n "${PERF_STAT:-}" ]; then kill -INT "$statpid"; wait "$statpid" || true; fi
    echo "$LABEL $(grep -oE '(throughput|p50_ms|p99_ms|errors)=[0-9.]+' <<<"$out" | paste -sd' ') cpu_us_per_put=$(((cpu1 - cpu0) * 10000 / TOTAL)) disk_bytes_per_put=$(((w1 - w0) / TOTAL))"
fi
