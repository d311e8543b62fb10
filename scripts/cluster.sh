#!/usr/bin/env bash
# Starts a three-member control plane on loopback in the foreground; Ctrl-C stops it.
# Members listen for clients on 127.0.0.1:7379, :7381, :7383 and keep their data under
# ${FLOTILLA_DATA:-./flotilla-data}; running it again restarts the same cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p flotilla-cli
bin=target/release/flotilla
data=${FLOTILLA_DATA:-./flotilla-data}
mkdir -p "$data"
initial="n1=127.0.0.1:7380,n2=127.0.0.1:7382,n3=127.0.0.1:7384"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for i in 1 2 3; do
    client=$((7379 + 2 * (i - 1)))
    "$bin" server --name "n$i" --data-dir "$data/n$i" \
        --client-addr "127.0.0.1:$client" --peer-addr "127.0.0.1:$((client + 1))" \
        --initial-cluster "$initial" &
    pids+=($!)
done
wait -n
