#!/usr/bin/env bash
# Eighth H200 call (the device time left): the gpu tests call 7's time limit did not reach.
set -u
R=${R:-/tmp/res8}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_REST:-70} python3 -m pytest -v -m gpu tests/test_plan_kernel.py tests/test_sweep.py tests/test_tables.py \
  -p no:cacheprovider --timeout 60 > "$R/gpu-tests-rest.log" 2>&1
timeout ${T_DEC:-150} python3 -m pytest -v -m gpu tests/test_patch.py -p no:cacheprovider --timeout 145 --durations=0 \
  > "$R/gpu-tests-patch.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/call8.tgz" "$(basename "$R")"
grep -E "PASS|FAIL|ERROR|passed|failed|Timeout" "$R"/gpu-tests-*.log | cut -c1-160
