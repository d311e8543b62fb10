#!/usr/bin/env bash
# Builds the image flotilla:local (or $IMAGE) from this checkout, without a registry:
# FROM scratch with the flotilla binary and the shared libraries it links.
#
# FLOTILLA_BIN=path uses that binary instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-flotilla:local}
BIN=${FLOTILLA_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release --locked -p flotilla-cli
    BIN=target/release/flotilla
fi
ROOT=target/deploy-rootfs
rm -rf "$ROOT"
mkdir -p "$ROOT/tmp"
cp "$BIN" "$ROOT/flotilla"
# Every library the binary links, at the path it asks for (symlinks followed).
for lib in $(ldd "$BIN" | grep -o '/[^ ]*'); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
if ! out=$(docker build -q -t "$IMAGE" -f deploy/Dockerfile "$ROOT" 2>&1); then
    echo "$out" >&2
    exit 1
fi
rm -rf "$ROOT"
echo "built $IMAGE from $BIN"
