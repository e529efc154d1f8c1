#!/usr/bin/env bash
# Third H200 session: the two ad-hoc commands between call11.sh and call12.sh and after call12.sh
# (each started with the install line and PYTHONPATH, like every call).
#   call 12a: the tiny model's stock layers, GPU vs CPU stream (cut at 200 s, after the 2-row
#             quantized linears had shown the MLX bug):
#     PYTHONUNBUFFERED=1 timeout 200 python3 scripts/qlinear_probe.py -o $OUT/res12/qlinear-probe.json
#   call 13: e2e with the compiled decode path and the new tables (cut at 170 s, no result):
#     timeout 170 python3 -m mlx_moe_tune.e2e --model gemma-26b-a4b --layers 4 --prompt 512 --gen 32 \
#       --compile -o $OUT/res13/e2e-gemma-26b-a4b-compiled.json
#   (--compile was the flag then; compile is the default now and e2e has --no-compile instead.)
set -eu
mkdir -p "$OUT/res13"
timeout 170 python3 -m mlx_moe_tune.e2e --model gemma-26b-a4b --layers 4 --prompt 512 --gen 32 \
  -o "$OUT/res13/e2e-gemma-26b-a4b-compiled.json" > "$OUT/res13/e2e-compiled.log" 2>&1
