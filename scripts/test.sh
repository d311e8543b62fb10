#!/usr/bin/env bash
# The test command: format and lint checks, every test in the workspace, then the chaos
# suite's fixed set of seeds.
#
# Installs what the tests need when it is missing: kubectl (Debian's kubectl), etcdctl (Debian's etcd-client) for the
# tests that drive the real binary with a third-party etcd client, busybox (Debian's
# busybox-static) for the image the docker runtime's tests build from local files, and a
# Python venv with grpcio and grpcio-tools (from PyPI) for the cross-language API client
# test.
set -euo pipefail
cd "$(dirname "$0")/.."

MISSING=()
command -v etcdctl >/dev/null 2>&1 || MISSING+=(etcd-client)
dpkg -s busybox-static >/dev/null 2>&1 || MISSING+=(busybox-static)
# The real kubectl reads the kubeconfigs `flotilla certs` writes.
command -v kubectl >/dev/null 2>&1 || MISSING+=(kubectl)
if [ ${#MISSING[@]} -gt 0 ]; then
    echo "installing ${MISSING[*]} ..." >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}" >/dev/null
fi

PYENV=target/pyenv
if ! "$PYENV/bin/python" -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
    echo "installing grpcio and grpcio-tools into $PYENV ..." >&2
    mkdir -p target
    python3 -m venv "$PYENV"
    "$PYENV/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools
fi
export FLOTILLA_PYTHON="$PWD/$PYENV/bin/python"

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# One build of everything, binaries and tests together: one feature set (the tests'
# dev-dependencies turn on features, such as tokio's test-util, that a build of the
# binaries alone would not, and every crate above them would be compiled twice). The
# tests, the chaos suite and the compose test all run these binaries.
cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi
export FLOTILLA_BIN=target/debug/flotilla
# The chaos suite's fixed set: real clusters under every fault, histories checked
# (docs/CHAOS.md), the process runs with TLS on every port. Reports land in
# target/chaos-reports.
target/debug/flotilla-chaos --ci
# The compose deployment (deploy/): three members and two workers in containers, the
# leader's container killed. Skipped where no Docker engine answers.
deploy/test.sh
