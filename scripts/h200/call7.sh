#!/usr/bin/env bash
# Seventh H200 call: the whole gpu test suite (per-test timeout), the N=704 gemma table re-tuned
# (call 6's tune ran out of time after N=1408; its measurement cache is reused: .dev/cache6.jsonl),
# then e2e and the skewed/sparse routers with the new tables. Results: $OUT/call7.tgz.
set -u
. "$(dirname "$0")/steps.sh"
R=${R:-/tmp/res7}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_TESTS:-170} python3 -m pytest -v -m gpu tests/ -p no:cacheprovider --timeout 120 --durations=0 > "$R/gpu-tests.log" 2>&1
export TABLES=/tmp/tables CACHE=$R/cache.jsonl; cp .dev/cache6.jsonl "$CACHE" 2>/dev/null
T_TUNE=${T_TUNE:-170} DEADLINE=${DEADLINE:-140} step_tune --shape 128,2816,704,8 --mode affine --bits 4 --group-size 64 --dtype bfloat16
export MLX_MOE_TUNE_TABLES="$TABLES"
step_e2e
T_ROUTER=${T_ROUTER:-40} step_routers
tar -C "$(dirname "$R")" -czf "$OUT/call7.tgz" "$(basename "$R")"
grep -E "PASS|FAIL|ERROR|passed|failed|Timeout" "$R/gpu-tests.log" | tail -30 | cut -c1-150; grep -E "^E=|wrote" "$R/tune.log" | cut -c1-110
grep -E "speedup|tokens" "$R/e2e-gemma-26b-a4b.json" | head; tail -1 "$R"/router-*.log
