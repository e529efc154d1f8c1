#!/usr/bin/env bash
# Sixth H200 call: the gemma-26b-a4b tables re-tuned with the natural-order shared-x build
# (isolated per-shape tune), their separate-process check, and the decode chain per qmv config.
# Results: $OUT/call6.tgz.
set -u
. "$(dirname "$0")/steps.sh"
R=${R:-/tmp/res6}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
export TABLES=/tmp/tables CACHE=$R/cache.jsonl
step_tune --preset gemma-26b-a4b
timeout ${T_CHECK:-110} python3 -m mlx_moe_tune.cli tune --check --table "$TABLES" -o "$R/check" > "$R/check.log" 2>&1
MLX_MOE_TUNE_TABLES="$TABLES" DECODE_SHAPES=${DECODE_SHAPES:-0} timeout ${T_DEC:-100} python3 scripts/h100/decode_configs.py "$R/decode" > "$R/decode.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/call6.tgz" "$(basename "$R")"
grep -E "^E=" "$R/tune.log" | cut -c1-110; tail -3 "$R/check.log"; grep -E "'op'|floor|stock" "$R/decode.log" | cut -c1-140
