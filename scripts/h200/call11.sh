#!/usr/bin/env bash
# Session 6, third H200 call: call10's decode_diag.py was cut at 150 s before printing anything
# (it printed only at the end). Now it prints each stage as it comes, GPU stages first, the CPU
# stream last. Then test_real_kernels (patched logits at L=1 and 40, no KV cache), never run on a GPU.
# Results: $OUT/call11.tgz.
set -u
R=${R:-/tmp/res11}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_DIAG:-240} python3 scripts/decode_diag.py -o "$R/decode-diag.json" > "$R/decode-diag.log" 2>&1
timeout ${T_REAL:-120} python3 -m pytest -v tests/test_patch.py -k "real_kernels" -p no:cacheprovider \
  --durations=0 > "$R/gpu-tests-real-kernels.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/call11.tgz" "$(basename "$R")"
cut -c1-400 "$R/decode-diag.log"
grep -E "PASS|FAIL|passed|failed|Error" "$R/gpu-tests-real-kernels.log" | cut -c1-200
