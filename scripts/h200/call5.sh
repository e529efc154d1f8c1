#!/usr/bin/env bash
# Fifth H200 call: A/B of the group-sum path (qmv, qmm BM8) against 8c3b574's kernels (.dev/old),
# then the H200 gemma-26b-a4b tables re-tuned with this build (isolated per-shape tune) and their
# separate-process check. Results: $OUT/call5.tgz.
set -u
. "$(dirname "$0")/steps.sh"
R=${R:-/tmp/res5}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
AB_POINTS=h200-gs timeout ${T_AB:-150} python3 scripts/h100/ab_kernels.py "${OLD:-.dev/old}" "$R/ab" 3 > "$R/ab.log" 2>&1
export TABLES=/tmp/tables CACHE=$R/cache.jsonl
step_tune --preset gemma-26b-a4b
MLX_MOE_TUNE_TABLES="$TABLES" timeout ${T_CHECK:-110} python3 -m mlx_moe_tune.cli tune --check -o "$R/check" > "$R/check.log" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/call5.tgz" "$(basename "$R")"
grep -E "^\{" "$R/ab.log" | cut -c1-120; tail -3 "$R/ab.log"; tail -4 "$R/tune.log"; tail -3 "$R/check.log"
