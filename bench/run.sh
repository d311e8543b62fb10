#!/usr/bin/env bash
# Side-by-side benchmark: a three-member Flotilla cluster and a three-member etcd 3.4 (Debian
# etcd-server, default timings) on loopback, driven by the same load generator, flotilla-bench
# (bench/src), whose etcd v3 client is generated from this repository's .proto files.
#
# Usage: bench/run.sh               # everything (about 20 minutes on 2 cores)
#        SCALE=0.1 RUNS=1 FAILOVER_RUNS=1 SKIP_FILL=1 SKIP_IDLE=1 bench/run.sh   # a quick check
#
#   RUNS=3            rounds of the throughput/latency suite; each round runs Flotilla, then
#                     etcd, each on a fresh cluster
#   FAILOVER_RUNS=5   leader kill -9 runs per system (the killed member is restarted after each)
#   SCALE=1           multiplies every operation count below
#   PUT_LEVELS="1:10000 16:40000 64:80000 256:120000"   put levels, CLIENTS:TOTAL (~10 s each)
#   RANGE_LEVELS="1:20000 64:150000"                    range levels, each linearizable and
#                                                       serializable, over 1,000 keys
#   WATCHERS="1 1000" WATCH_PUTS=1000 WATCH_RATE=200    watch delivery runs
#   WARM_PUTS=0       puts (64 clients, 100,000 keys, not recorded) before the put levels, to
#                     measure a steady state: every key written, compaction deleting history
#   SKIP_FILL=1       skip the disk and memory run (1,000,000 puts over 10,000 keys; measured
#                     10 s and again 40 s after)
#   SKIP_IDLE=1       skip the idle-RSS run (100,000 keys of 1,000 bytes)
#   ONLY=flotilla|etcd  run one system only
#   BASE_PORT=23790   Flotilla uses BASE_PORT..+5, etcd BASE_PORT+10..+15 (client, peer pairs)
#   FLOTILLA_SERVER_ARGS="--snapshot-bytes 8388608"   extra `flotilla server` flags
#   KEEP_WORK=1       keep the members' data dirs and logs (the path is printed at the end)
#   TLS=1             both systems with TLS on both ports, client certificates required, the
#                     same certificates (made by `flotilla certs`): Flotilla with its etcd-named
#                     flags, etcd with its own; the load generator with --cacert/--cert/--key
#
# Results: bench/results/<date>/results.jsonl (one JSON object per measurement, with "system"
# and "round"), summary.md (medians and Flotilla/etcd ratios), bench.log (the load generator's
# progress and errors), logs/ (the last 200 lines of every member's log).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
FAILOVER_RUNS=${FAILOVER_RUNS:-5}
SCALE=${SCALE:-1}
PUT_LEVELS=${PUT_LEVELS:-"1:10000 16:40000 64:80000 256:120000"}
RANGE_LEVELS=${RANGE_LEVELS:-"1:20000 64:150000"}
WATCHERS=${WATCHERS:-"1 1000"}
WATCH_PUTS=${WATCH_PUTS:-1000}
WATCH_RATE=${WATCH_RATE:-200}
ONLY=${ONLY:-}
BASE_PORT=${BASE_PORT:-23790}
FLOTILLA_SERVER_ARGS=${FLOTILLA_SERVER_ARGS:-}
WARM_PUTS=${WARM_PUTS:-0}
TLS=${TLS:-0}

out="bench/results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/logs"
results="$out/results.jsonl"
: >"$results"

log() { echo "== $*" >&2; }

# --- binaries ---------------------------------------------------------------------------------

systems="flotilla etcd"
if [ -n "$ONLY" ]; then systems=$ONLY; fi
packages=(-p flotilla-bench)
if [[ " $systems " == *" flotilla "* ]]; then packages+=(-p flotilla-cli); fi
cargo build --release "${packages[@]}" >&2
FLOTILLA=$PWD/target/release/flotilla
BENCH=$PWD/target/release/flotilla-bench
if ! command -v etcd >/dev/null; then
    log "installing etcd-server"
    apt-get install -y -qq etcd-server >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq etcd-server >/dev/null; }
fi
# A packaged etcd may have been started on the default ports; it is not ours and not in the way,
# but it would compete for the CPU.
systemctl stop etcd 2>/dev/null || true

# --- members ----------------------------------------------------------------------------------

work=$(mktemp -d /tmp/flotilla-bench.XXXXXX) # $sys/$member/data, logs/$sys-$member.log
mkdir -p "$work/logs"
# TLS=1: one CA, a member certificate per member of either system, an admin for the load.
TLS_ARGS=()
if [ "$TLS" = 1 ]; then
    pki="$work/pki"
    "$FLOTILLA" certs init --dir "$pki" >/dev/null
    for m in n1 n2 n3 e1 e2 e3; do
        "$FLOTILLA" certs issue --dir "$pki" --name "$m" --kind member >/dev/null
    done
    "$FLOTILLA" certs issue --dir "$pki" --name admin --kind user --group system:masters >/dev/null
    TLS_ARGS=(--cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key")
fi
declare -A PIDS # "$sys$i" -> pid of member i
writer=""       # pid of a background unavailability writer

cleanup() {
    local p
    if [ -n "$writer" ]; then kill "$writer" 2>/dev/null || true; fi
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for p in "$work"/logs/*.log; do
        if [ -f "$p" ]; then tail -n 200 "$p" >"$out/logs/$(basename "$p")"; fi
    done
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "members' data dirs and logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Scales an operation count: n 1000 -> 1000 * SCALE (at least 1).
n() { python3 -c "import sys; print(max(1, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$SCALE"; }

# Member i's client port (its peer port is the next one).
base_of() { if [ "$1" = flotilla ]; then echo "$BASE_PORT"; else echo $((BASE_PORT + 10)); fi; }
client_port() { echo $(($(base_of "$1") + 2 * ($2 - 1))); }
prefix_of() { if [ "$1" = flotilla ]; then echo n; else echo e; fi; }
endpoints() { echo "127.0.0.1:$(client_port "$1" 1),127.0.0.1:$(client_port "$1" 2),127.0.0.1:$(client_port "$1" 3)"; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
scheme=http
if [ "$TLS" = 1 ]; then scheme=https; fi

# start_member SYS I: starts member I of SYS on its data dir (kept if it exists: a restart).
start_member() {
    local sys=$1 i=$2 pfx cp pp dir
    pfx=$(prefix_of "$sys")
    cp=$(client_port "$sys" "$i")
    pp=$((cp + 1))
    dir="$work/$sys/$pfx$i"
    mkdir -p "$dir"
    local logf="$work/logs/$sys-$pfx$i.log"
    for p in "$cp" "$pp"; do
        if port_in_use "$p"; then echo "port $p is in use; set BASE_PORT" >&2; exit 1; fi
    done
    local cluster="" j
    for j in 1 2 3; do
        local peer="127.0.0.1:$(($(client_port "$sys" "$j") + 1))"
        if [ "$sys" = flotilla ]; then cluster+="$pfx$j=$peer,"; else cluster+="$pfx$j=$scheme://$peer,"; fi
    done
    cluster=${cluster%,}
    local tls=()
    if [ "$TLS" = 1 ]; then
        local c="$pki/$pfx$i.crt" k="$pki/$pfx$i.key"
        tls=(--cert-file "$c" --key-file "$k" --trusted-ca-file "$pki/ca.crt" --client-cert-auth
            --peer-cert-file "$c" --peer-key-file "$k" --peer-trusted-ca-file "$pki/ca.crt")
        if [ "$sys" = etcd ]; then tls+=(--peer-client-cert-auth); fi
    fi
    if [ "$sys" = flotilla ]; then
        "$FLOTILLA" server --name "$pfx$i" --data-dir "$dir/data" \
            --client-addr "127.0.0.1:$cp" --peer-addr "127.0.0.1:$pp" \
            --initial-cluster "$cluster" "${tls[@]}" $FLOTILLA_SERVER_ARGS >>"$logf" 2>&1 &
    else
        local state=new
        if [ -d "$dir/data/member" ]; then state=existing; fi
        etcd --name "$pfx$i" --data-dir "$dir/data" \
            --listen-client-urls "$scheme://127.0.0.1:$cp" --advertise-client-urls "$scheme://127.0.0.1:$cp" \
            --listen-peer-urls "$scheme://127.0.0.1:$pp" --initial-advertise-peer-urls "$scheme://127.0.0.1:$pp" \
            --initial-cluster "$cluster" --initial-cluster-state "$state" \
            --initial-cluster-token flotilla-bench "${tls[@]}" >>"$logf" 2>&1 &
    fi
    PIDS[$sys$i]=$!
}

# Waits until every member answers, all agree on a leader and serve linearizable reads.
wait_healthy() {
    if ! "$BENCH" "${TLS_ARGS[@]}" --endpoints "$(endpoints "$1")" health --wait 60 >/dev/null 2>>"$out/bench.log"; then
        echo "$1 is not healthy after 60 s (see $out/bench.log and $out/logs/)" >&2
        exit 1
    fi
}

start_cluster() {
    local sys=$1 i
    rm -rf "${work:?}/$sys"
    for i in 1 2 3; do start_member "$sys" "$i"; done
    wait_healthy "$sys"
}

stop_member() {
    local pid=${PIDS[$1$2]:-} t
    if [ -z "$pid" ]; then return; fi
    kill "$pid" 2>/dev/null || true
    for t in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$1$2]"
}

stop_cluster() { local i; for i in 1 2 3; do stop_member "$1" "$i"; done; }

# --- measurements -----------------------------------------------------------------------------

# record SYS ROUND JSON: appends JSON with "system" and "round" added to the results.
record() {
    python3 -c 'import json,sys; d=json.loads(sys.argv[3]); d["system"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' \
        "$1" "$2" "$3" | tee -a "$results"
}

# bench SYS ROUND ARGS...: runs flotilla-bench against SYS and records its result. A failed run
# is reported and skipped: one failure does not end the whole benchmark.
bench() {
    local sys=$1 round=$2 r
    shift 2
    log "$sys round $round: $*"
    if r=$("$BENCH" "${TLS_ARGS[@]}" --json --endpoints "$(endpoints "$sys")" "$@" 2>>"$out/bench.log"); then
        record "$sys" "$round" "$r"
    else
        echo "FAILED: $sys $* (see $out/bench.log)" | tee -a "$out/bench.log" >&2
    fi
}

# The throughput and latency suite on a fresh cluster.
suite() {
    local sys=$1 round=$2 level c w
    start_cluster "$sys"
    if [ "$WARM_PUTS" -gt 0 ]; then
        log "$sys round $round: warm-up, $WARM_PUTS puts"
        "$BENCH" "${TLS_ARGS[@]}" --endpoints "$(endpoints "$sys")" put --clients 64 --total "$WARM_PUTS" \
            --value-size 256 >/dev/null 2>>"$out/bench.log"
    fi
    for level in $PUT_LEVELS; do
        bench "$sys" "$round" put --clients "${level%%:*}" --total "$(n "${level#*:}")" --value-size 256
    done
    "$BENCH" "${TLS_ARGS[@]}" --endpoints "$(endpoints "$sys")" fill --keys 1000 --total 1000 --clients 16 >/dev/null 2>>"$out/bench.log"
    for level in $RANGE_LEVELS; do
        for c in l s; do
            bench "$sys" "$round" range --clients "${level%%:*}" --total "$(n "${level#*:}")" \
                --consistency $c --key-space 1000
        done
    done
    for w in $WATCHERS; do
        bench "$sys" "$round" watch-latency --watchers "$w" --puts "$(n "$WATCH_PUTS")" --rate "$WATCH_RATE"
    done
    stop_cluster "$sys"
}

# The member number of SYS's leader.
leader_member() {
    local sys=$1 leader i
    leader=$("$BENCH" "${TLS_ARGS[@]}" --endpoints "$(endpoints "$sys")" leader 2>>"$out/bench.log") || return 1
    for i in 1 2 3; do
        if [ "$leader" = "127.0.0.1:$(client_port "$sys" "$i")" ]; then echo "$i"; fi
    done
}

# FAILOVER_RUNS times: a writer runs, the leader is killed with -9 after 3 s, the writer's longest
# gap between acknowledged puts is recorded; then the victim is restarted and the cluster must
# become healthy again (the time that takes is recorded as rejoin_ms).
failover() {
    local sys=$1 run victim r t0
    start_cluster "$sys"
    for run in $(seq 1 "$FAILOVER_RUNS"); do
        log "$sys failover $run"
        "$BENCH" "${TLS_ARGS[@]}" --json --endpoints "$(endpoints "$sys")" unavailability --duration 8 \
            --timeout-ms 200 --interval-ms 10 >"$work/unavail.json" 2>>"$out/bench.log" &
        writer=$!
        sleep 3
        if ! victim=$(leader_member "$sys") || [ -z "$victim" ]; then
            echo "FAILED: $sys failover $run: no leader found" | tee -a "$out/bench.log" >&2
            wait "$writer" || true
            writer=""
            continue
        fi
        kill -9 "${PIDS[$sys$victim]}"
        wait "${PIDS[$sys$victim]}" 2>/dev/null || true
        if wait "$writer"; then
            record "$sys" "$run" "$(cat "$work/unavail.json")"
        else
            echo "FAILED: $sys failover $run: the writer failed (see $out/bench.log)" | tee -a "$out/bench.log" >&2
        fi
        writer=""
        t0=$(date +%s%N)
        start_member "$sys" "$victim"
        wait_healthy "$sys"
        r=$(( ($(date +%s%N) - t0) / 1000000 ))
        record "$sys" "$run" "{\"bench\":\"rejoin\",\"member\":$victim,\"rejoin_ms\":$r}"
    done
    stop_cluster "$sys"
}

# measure_members SYS LABEL: records each member's data dir size and RSS.
measure_members() {
    local sys=$1 label=$2 i rss size pfx
    pfx=$(prefix_of "$sys")
    for i in 1 2 3; do
        rss=$(awk '/^VmRSS/ {print $2}' "/proc/${PIDS[$sys$i]}/status")
        size=$(du -sb "$work/$sys/$pfx$i/data" | cut -f1)
        # Where it goes: each top-level entry of the data dir.
        local parts="" part
        for part in "$work/$sys/$pfx$i/data"/*; do
            parts+="\"$(basename "$part")\":$(du -sb "$part" | cut -f1),"
        done
        # And every file in it, for a closer look (du's bytes are apparent sizes).
        { echo "## $sys member $i, $label"; (cd "$work/$sys/$pfx$i/data" && find . -type f -printf '%s\t%p\n' | sort -k2); } >>"$out/files.txt"
        record "$sys" 1 "{\"bench\":\"$label\",\"member\":$i,\"data_dir_bytes\":$size,\"rss_kib\":$rss,\"parts\":{${parts%,}}}"
    done
}

# --- the run ----------------------------------------------------------------------------------

{
    echo "# flotilla-bench side by side, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
    echo "- etcd: $(etcd --version 2>/dev/null | head -1)"
    echo "- machine: $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
    echo "- TLS=$TLS RUNS=$RUNS FAILOVER_RUNS=$FAILOVER_RUNS SCALE=$SCALE PUT_LEVELS=\"$PUT_LEVELS\" RANGE_LEVELS=\"$RANGE_LEVELS\" WATCHERS=\"$WATCHERS\" WARM_PUTS=$WARM_PUTS"
    echo
} >"$out/header.md"

for round in $(seq 1 "$RUNS"); do
    for sys in $systems; do suite "$sys" "$round"; done
done

for sys in $systems; do failover "$sys"; done

if [ "${SKIP_FILL:-0}" != 1 ]; then
    for sys in $systems; do
        start_cluster "$sys"
        bench "$sys" 1 fill --keys 10000 --total "$(n 1000000)" --value-size 256 --clients 64
        sleep 10 # let automatic compaction and snapshots run
        measure_members "$sys" disk
        if [ "$sys" = flotilla ]; then
            # What the store must keep: the live keys and the retained history, as a backup
            # (one snapshot file) holds them.
            if "$FLOTILLA" snapshot save "$work/live.snap" --server "127.0.0.1:$(client_port "$sys" 1)" >/dev/null 2>>"$out/bench.log"; then
                record "$sys" 1 "{\"bench\":\"live-state\",\"snapshot_bytes\":$(stat -c %s "$work/live.snap")}"
                rm -f "$work/live.snap"
            fi
        fi
        sleep 30 # and what the members' files settle to once idle
        measure_members "$sys" disk-40s
        stop_cluster "$sys"
    done
fi

if [ "${SKIP_IDLE:-0}" != 1 ]; then
    # RSS of idle members holding 100 MB of live data (100,000 keys of 1,000-byte values).
    for sys in $systems; do
        start_cluster "$sys"
        bench "$sys" 1 fill --keys 100000 --total "$(n 100000)" --value-size 1000 --clients 64
        sleep 15
        measure_members "$sys" idle-100MB
        stop_cluster "$sys"
    done
fi

{
    cat "$out/header.md"
    python3 bench/summarize.py "$results"
} | tee "$out/summary.md"
rm -f "$out/header.md"
