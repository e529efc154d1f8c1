#!/usr/bin/env bash
# Fourth H200 call: A/B of the natural-order shared-x path against 76f1506's kernels (.dev/old,
# exported with git show), the decode chain per qmv config with its per-call floors, and the whole
# gpu test suite (per-test timeout). Results: $OUT/call4.tgz.
set -u
R=${R:-/tmp/res4}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
AB_POINTS=h200 timeout ${T_AB:-240} python3 scripts/h100/ab_kernels.py "${OLD:-.dev/old}" "$R/ab" 3 > "$R/ab.log" 2>&1
DECODE_SHAPES=${DECODE_SHAPES:-0} timeout ${T_DEC:-100} python3 scripts/h100/decode_configs.py "$R/decode" > "$R/decode.log" 2>&1
timeout ${T_TESTS:-200} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --timeout 150 > "$R/gpu-tests.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/call4.tgz" "$(basename "$R")"
grep -E "^\{" "$R/ab.log" | cut -c1-150; tail -3 "$R/ab.log"; grep -E "op|floor|stock" "$R/decode.log" | cut -c1-160; tail -3 "$R/gpu-tests.log"
