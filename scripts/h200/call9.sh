#!/usr/bin/env bash
# Third H200 session, call 9 (run with T_DEC=300 T_SELF=150 T_CHECK=110 T_E2E=120; the e2e was cut):
# what the second session's device time did not reach.
#   1. the decode-path gpu tests: one SwitchGLU with fixed expert ids, default and compiled (does
#      the compiled path compute the same thing?), the 1-layer step-by-step KV-cache decode, and
#      the fixed shipped-table test; then the rest of the gpu suite. A fresh machine spends
#      minutes in MLX's first NVRTC compiles: keep the limits generous.
#   2. selftest of every qmm_glu config on the GPU (its shared-x path changed; not run on a GPU since),
#      the separate-process check of the N=704 H200 table, then e2e with the shipped tables.
# Results: $OUT/call9.tgz.
set -u
. "$(dirname "$0")/steps.sh"
R=${R:-/tmp/res9}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_DEC:-240} python3 -m pytest -v -m gpu tests/test_patch.py tests/test_tables.py -p no:cacheprovider \
  --timeout 200 --durations=0 > "$R/gpu-tests-patch.log" 2>&1
timeout ${T_SELF:-120} python3 -m mlx_moe_tune.cli selftest --backend cuda --family qmm_glu > "$R/selftest-qmm-glu.log" 2>&1
timeout ${T_CHECK:-100} python3 -m mlx_moe_tune.cli tune --check --only 128,2816,704 -o "$R/check" > "$R/check.log" 2>&1
step_e2e
tar -C "$(dirname "$R")" -czf "$OUT/call9.tgz" "$(basename "$R")"
grep -E "PASS|FAIL|XFAIL|ERROR|passed|failed" "$R/gpu-tests-patch.log" | cut -c1-160; tail -2 "$R/selftest-qmm-glu.log" "$R/check.log"
grep -E "speedup|logit" "$R/e2e-gemma-26b-a4b.json"
