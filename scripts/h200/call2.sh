#!/usr/bin/env bash
# Second H200 call: gpu tests + selftest (the new qmv_glu on the real GPU), the decode layer and
# e2e (stock vs patched), and the skewed/sparse routers for the op. Results: $OUT/call2.tgz.
set -u
. "$(dirname "$0")/steps.sh"
R=${R:-/tmp/res2}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_TESTS:-200} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider > "$R/gpu-tests.log" 2>&1
timeout ${T_SELF:-60} python3 -m mlx_moe_tune.cli selftest --backend cuda --family qmv_glu --family qmv > "$R/selftest.log" 2>&1
timeout ${T_LAYER:-60} python3 scripts/h200/decode_layer.py "$R" > "$R/decode-layer.log" 2>&1
T_E2E=${T_E2E:-130} step_e2e
step_routers
tar -C "$(dirname "$R")" -czf "$OUT/call2.tgz" "$(basename "$R")"
tail -2 "$R/gpu-tests.log"; tail -3 "$R/selftest.log"; cat "$R/decode-layer.log" | tail -3; grep speedup "$R/e2e-gemma-26b-a4b.json"; tail -1 "$R"/router-*.log
