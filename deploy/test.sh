#!/usr/bin/env bash
# The compose deployment, end to end: build the image, bring up three members and two
# workers (docker runtime), apply a Deployment of busybox httpd pods that must pass an HTTP
# readiness probe, kill the leader's container, and see writes and the workload recover;
# everything is torn down on exit, pass or fail. Needs /bin/busybox (Debian's
# busybox-static) for the pods' image.
#
# FLOTILLA_BIN: the binary for the image and the CLI (default: the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker version >/dev/null 2>&1; then
    echo "deploy test: no Docker engine answers; skipped" >&2
    exit 0
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "installing docker-compose ..." >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null
fi
if [ -z "${FLOTILLA_BIN:-}" ]; then
    cargo build --release --locked -p flotilla-cli
    FLOTILLA_BIN=target/release/flotilla
fi
export FLOTILLA_BIN
FLOTILLA=$(realpath "$FLOTILLA_BIN")

PROJECT=flotilla-deploy-test-$$
export FLOTILLA_IMAGE=flotilla:deploy-test-$$
export FLOTILLA_NETWORK=$PROJECT FLOTILLA_NODE_PREFIX=t$$-
WEB_IMAGE=flotilla-deploy-test-web:$$
IMAGE=$FLOTILLA_IMAGE deploy/build-image.sh
# The pods' image, from local files: busybox on an empty base.
[ -x /bin/busybox ] || { echo "deploy test: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }
WEB_CTX=$(mktemp -d)
cp /bin/busybox "$WEB_CTX/"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n' > "$WEB_CTX/Dockerfile"
docker build -q -t "$WEB_IMAGE" "$WEB_CTX" >/dev/null
rm -rf "$WEB_CTX"

# Published ports below the ephemeral range, free now.
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo $p; return; fi
    done
}
export N1_PORT=$(free_port) N2_PORT=$(free_port) N3_PORT=$(free_port)
export FLOTILLA_SERVER=127.0.0.1:$N1_PORT,127.0.0.1:$N2_PORT,127.0.0.1:$N3_PORT
compose() { docker-compose -p "$PROJECT" -f deploy/compose.yaml "$@"; }
cleanup() {
    local rc=$?
    if [ $rc != 0 ]; then
        echo "deploy test failed; the members' logs:" >&2
        compose logs --no-color --tail 40 >&2 || true
    fi
    compose kill w1 w2 >/dev/null 2>&1 || true
    # The workers' pods are the engine's containers, not compose's: they go first (the
    # network cannot go while they are on it).
    local pods
    pods=$(docker ps -aq --filter "label=io.flotilla.node=${FLOTILLA_NODE_PREFIX}w1"
        docker ps -aq --filter "label=io.flotilla.node=${FLOTILLA_NODE_PREFIX}w2")
    [ -z "$pods" ] || docker rm -f $pods >/dev/null 2>&1 || true
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    docker rmi "$FLOTILLA_IMAGE" "$WEB_IMAGE" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# until DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds.
until_ok() {
    local what=$1 secs=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "deploy test: timed out after ${secs}s waiting for $what" >&2
            "$@" >&2 || true
            return 1
        fi
        sleep 0.5
    done
    echo "deploy test: $what"
}

compose up -d --quiet-pull 2>/dev/null || compose up -d
has_leader() { "$FLOTILLA" cluster status | grep -q '^leader: n'; }
until_ok "a leader" 60 has_leader
nodes_ready() { [ "$("$FLOTILLA" get nodes | grep -c ' Ready')" = 2 ]; }
until_ok "both workers Ready" 60 nodes_ready

"$FLOTILLA" apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: $WEB_IMAGE
        command: [sh, -c, "mkdir -p /www && echo \$POD_NAME > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {port: 8080, path: /}, periodSeconds: 1}
        resources: {requests: {cpu: 100m, memory: 32Mi}, limits: {memory: 64Mi}}
YAML
available() {
    "$FLOTILLA" get deployment web -o json | grep -q "\"availableReplicas\": $1\b"
}
until_ok "3 replicas available (each served its readiness probe)" 90 available 3
# The replicas are the engine's containers, labelled with the worker that runs them.
web_containers() {
    local n=0 w
    for w in w1 w2; do
        n=$((n + $(docker ps -q --filter label=io.flotilla.container=web \
            --filter "label=io.flotilla.node=${FLOTILLA_NODE_PREFIX}$w" | wc -l)))
    done
    [ "$n" = "$1" ]
}
until_ok "3 web containers running on the engine" 10 web_containers 3

LEADER=$("$FLOTILLA" cluster status | sed -n 's/^leader: \(n[0-9]\).*/\1/p')
echo "deploy test: killing the leader's container ($LEADER)"
compose kill "$LEADER" >/dev/null 2>&1
new_leader() { "$FLOTILLA" cluster status | grep '^leader: n' | grep -vq "^leader: $LEADER "; }
until_ok "a new leader" 30 new_leader
until_ok "a write through the new leader (scale to 5)" 30 "$FLOTILLA" scale deployment web --replicas 5
until_ok "5 replicas available with the old leader down" 60 available 5
until_ok "5 web containers running on the engine" 10 web_containers 5

compose start "$LEADER" >/dev/null 2>&1
all_three() { [ "$("$FLOTILLA" cluster status | grep -cE ' (leader|follower) ')" = 3 ]; }
until_ok "the old leader back as a member" 60 all_three
echo "deploy test: passed"
