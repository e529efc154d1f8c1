#!/usr/bin/env bash
# First call on a lent H200 (after the MLX-CUDA install line): device facts, the gpu tests, the
# bandwidth probes, the default sweep (stock + every tuned config) and the e2e model, so the
# H100-era kernels and tables are seen on this device before anything changes.
# Results: $OUT/baseline.tgz (R=... folder) + $OUT/summary.txt.
set -u
R=${R:-/tmp/res}; mkdir -p "$R"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv > "$R/nvidia-smi.csv" 2>&1
python3 -m mlx_moe_tune.cli info --json > "$R/info.json" 2> "$R/info.err"
timeout ${T_TESTS:-170} python3 -m pytest -q -m gpu tests/ -x -p no:cacheprovider > "$R/gpu-tests.log" 2>&1
timeout ${T_SWEEP:-260} python3 -m mlx_moe_tune.cli sweep --m 1..64x2 --iters 20 --quiet \
  --kernels 'stock.gather_qmm,stock.gather_qmm_unsorted,ref.bandwidth,tuned.qmv,tuned.qmm,tuned.auto' \
  -o "$R/gemma-26b-a4b-baseline.csv" > "$R/sweep.log" 2>&1
timeout ${T_E2E:-90} python3 -m mlx_moe_tune.cli bench-model --arch gemma-26b-a4b --random --layers 4 -p 512 -g 32 \
  -n 3 --deadline $(( ${T_E2E:-90} - 20 )) --json "$R/e2e-gemma-26b-a4b.json" > "$R/e2e.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/baseline.tgz" "$(basename "$R")"
{ cat "$R/nvidia-smi.csv"; tail -3 "$R/gpu-tests.log"; tail -3 "$R/sweep.log"; tail -4 "$R/e2e.log"; } > "$OUT/summary.txt"
cat "$OUT/summary.txt"
