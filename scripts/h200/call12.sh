#!/usr/bin/env bash
# Session 6, fourth H200 call. qlinear_probe.py (call 12a) found MLX 0.32.4 CUDA's stock
# quantized_matmul wrong and run-to-run unstable at 2 rows of the tiny model (K=64): that, not our
# kernels, made test_decode_steps_on_gpu and test_real_kernels fail. Now:
#   1. the probe over M x K x N of mx.quantized_matmul (4-bit gs64), GPU vs CPU stream;
#   2. the reworked GPU tests of test_patch.py (experts-only quantized model, CPU-stream reference).
# Results: $OUT/call12.tgz.
set -u
R=${R:-/tmp/res12}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_PROBE:-90} python3 scripts/qlinear_probe.py --shapes -o "$R/qmm-shapes.json" > "$R/qmm-shapes.log" 2>&1
timeout ${T_TESTS:-230} python3 -m pytest -v tests/test_patch.py -k "on_gpu or real_kernels" -p no:cacheprovider \
  --timeout 200 --durations=0 > "$R/gpu-tests-patch.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/call12.tgz" "$(basename "$R")"
python3 - "$R/qmm-shapes.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["M"], r["K"], r["N"], round(r["gpu_vs_cpu"], 4), round(r["gpu_run_to_run"], 4))
PY
grep -E "PASS|FAIL|passed|failed|Error" "$R/gpu-tests-patch.log" | cut -c1-200
