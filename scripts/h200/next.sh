#!/usr/bin/env bash
# Prepared for the next H200 session (NOT run yet). Two calls:
#   bash scripts/h200/next.sh ab     # ~500 s: A/B of the two new tile params, neither run on a GPU
#                                    # yet, on the H200 tables' configs in one process, interleaved
#                                    # rounds: PF (L2 prefetch) 0 vs 3, WS (W through shared memory)
#                                    # 0 vs 1; then the PF/WS configs vs numpy on the GPU
#                                    # (test_prefetch_and_shared_w_on_gpu) and emulator-vs-GPU
#   bash scripts/h200/next.sh rest   # ~550 s: decode layer (compiled, now the default, vs not),
#                                    # e2e with the compiled decode path, the whole gpu suite
# If one wins: re-tune with it searched (step_tune --space PF=0,3 and/or --space WS=0,1; each value
# doubles the NVRTC compiles and the tune), check the tables, and then put the value in qmv.py /
# qmm.py CUDA_SPACE in place of a losing one (tests/test_kernels_cuda.py caps a space at 16).
# A fresh machine spends minutes in MLX's first NVRTC compiles.
# Results: $OUT/next-<step>.tgz.
set -u
. "$(dirname "$0")/steps.sh"
STEP=${1:?ab or rest}
R=${R:-/tmp/resnext-$STEP}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
if [ "$STEP" = ab ]; then
  AB_POINTS=h200 timeout ${T_AB:-200} python3 scripts/h100/ab_kernels.py --vary PF=0,3 "$R/ab-pf" 3 > "$R/ab-pf.log" 2>&1
  AB_POINTS=h200 timeout ${T_AB:-200} python3 scripts/h100/ab_kernels.py --vary WS=0,1 "$R/ab-ws" 3 > "$R/ab-ws.log" 2>&1
  timeout ${T_EMU:-150} python3 -m pytest -v -m gpu tests/test_kernels_cuda.py tests/test_emulator_cuda.py \
    -p no:cacheprovider --timeout 140 > "$R/gpu-tests-pf-ws-emulator-vs-gpu.log" 2>&1
else
  timeout ${T_LAYER:-150} python3 scripts/h200/decode_layer.py "$R/decode" > "$R/decode-layer.log" 2>&1
  T_E2E=${T_E2E:-250} step_e2e
  timeout ${T_SUITE:-300} python3 -m pytest -m gpu tests/ -p no:cacheprovider --timeout 200 --durations=0 \
    > "$R/gpu-tests-all.log" 2>&1
fi
tar -C "$(dirname "$R")" -czf "$OUT/next-$STEP.tgz" "$(basename "$R")"
tail -n 30 "$R"/*.log | cut -c1-220
