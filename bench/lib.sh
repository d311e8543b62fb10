# Shared by the bench scripts that start a three-member cluster on loopback: source it.

# cluster_addrs BASE: sets `initial` (the --initial-cluster value: n1..n3 with peer ports
# BASE+1, BASE+3, BASE+5) and `endpoints` (client addresses BASE, BASE+2, BASE+4).
cluster_addrs() {
    local base=$1 i c
    initial=""; endpoints=""
    for i in 1 2 3; do
        c=$((base + 2 * (i - 1)))
        initial+="${initial:+,}n$i=127.0.0.1:$((c + 1))"
        endpoints+="${endpoints:+,}127.0.0.1:$c"
    done
}
