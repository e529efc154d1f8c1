#!/usr/bin/env bash
# Third H200 call: the compiled decode layer vs stock, then H200 tuning tables for gemma-26b-a4b
# (isolated per-shape tune) and their separate-process check. Results: $OUT/call3.tgz.
set -u
. "$(dirname "$0")/steps.sh"
R=${R:-/tmp/res3}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
timeout ${T_LAYER:-80} python3 scripts/h200/decode_layer.py "$R" > "$R/decode-layer.log" 2>&1
export TABLES=/tmp/tables CACHE=$R/cache.jsonl
T_TUNE=${T_TUNE:-280} DEADLINE=${DEADLINE:-250} step_tune --preset gemma-26b-a4b
MLX_MOE_TUNE_TABLES="$TABLES" timeout ${T_CHECK:-120} python3 -m mlx_moe_tune.cli tune --check -o "$R/check" > "$R/check.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/call3.tgz" "$(basename "$R")"
tail -4 "$R/decode-layer.log"; tail -4 "$R/tune.log"; tail -3 "$R/check.log"
