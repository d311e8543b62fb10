#!/usr/bin/env bash
# Runs the hostile-input property tests (the fuzz targets of issue 35) over and over with
# fresh random inputs for SECONDS (default 300), and stops at the first failure.
#
# proptest keeps every failing input under the test crate's proptest-regressions/ folder
# and replays it first on every later run, so a crash found here stays a regression test:
# commit that file with the fix.
#
#   scripts/fuzz.sh 600
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-300}
CASES=${PROPTEST_CASES:-20000}
cargo build -q --tests -p flotilla-apiserver --locked
deadline=$(( $(date +%s) + SECONDS_TO_RUN ))
rounds=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    PROPTEST_CASES=$CASES cargo test -q -p flotilla-apiserver --locked \
        --test hostile_text --test bad_input -- never_panic or_refuse \
        >/tmp/fuzz-round.log 2>&1 || {
        cat /tmp/fuzz-round.log
        echo "fuzz: a failure after $rounds rounds; its input is in apiserver/proptest-regressions/" >&2
        exit 1
    }
    rounds=$((rounds + 1))
done
echo "fuzz: $rounds rounds of $CASES cases per target, no failure"
