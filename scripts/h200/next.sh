#!/usr/bin/env bash
# Prepared for the next H200 session (NOT run yet): what this session's device time did not reach.
#   1. decode_layer.py: one gemma SwitchGLU layer, stock vs patched compiled (now the default)
#      vs uncompiled, host graph-build time and time per call in a 32-call chain;
#   2. e2e with the compiled decode path (the default) and the shipped tables: call 13 was cut at
#      170 s on a fresh process; give it 300 s;
#   3. the whole gpu suite (tests/test_patch.py's GPU tests passed in call 12; the rest passed
#      in calls 7-9), as one regression run.
# A fresh machine spends minutes in MLX's first NVRTC compiles: keep the limits generous.
# Results: $OUT/next.tgz.
set -u
. "$(dirname "$0")/steps.sh"
R=${R:-/tmp/resnext}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_LAYER:-150} python3 scripts/h200/decode_layer.py "$R/decode" > "$R/decode-layer.log" 2>&1
T_E2E=${T_E2E:-300} step_e2e
timeout ${T_SUITE:-400} python3 -m pytest -m gpu tests/ -p no:cacheprovider --timeout 200 --durations=0 \
  > "$R/gpu-tests-all.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/next.tgz" "$(basename "$R")"
grep -E "speedup|logit" "$R/e2e-gemma-26b-a4b.json"; tail -3 "$R/gpu-tests-all.log"
