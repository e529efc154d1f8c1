#!/usr/bin/env bash
# How the shipped H100 tables (mlx_moe_tune/tables/) were made: run on the lent H100 from the
# repository root, after the MLX-CUDA install line of the README's device section.
#   OUT: where results go; CACHE: the tuner's measurement cache (carried between device calls,
#   so a call cut short resumes where it stopped). Stage: tune | check | graphs
set -u
OUT=${OUT:-out}; CACHE=${CACHE:-$OUT/cache.jsonl}; TABLES=${TABLES:-/tmp/tables}
PRESETS=gemma-26b-a4b,qwen3-30b-a3b
mkdir -p "$OUT" "$TABLES"
case "${1:-tune}" in
  tune)  # search every m bucket of both presets, then recheck the choices and the heuristic gap
    timeout "${LIMIT:-500}" python3 -m mlx_moe_tune.cli tune --preset $PRESETS --m 1..64x2 --backend cuda \
      --table "$TABLES" --cache "$CACHE" -o "$OUT/tune" --deadline "${DEADLINE:-420}" ${CHECKS---recheck --heuristic-gap} \
      > "$OUT/tune.log" 2>&1
    tar -C "$(dirname "$TABLES")" -czf "$OUT/tables.tgz" "$(basename "$TABLES")" ;;
  check)  # a separate process, fresh inputs: do the tables reproduce within 10%?
    MLX_MOE_TUNE_TABLES="$TABLES" timeout "${LIMIT:-300}" python3 -m mlx_moe_tune.cli tune --check -o "$OUT/check" > "$OUT/check.log" 2>&1 ;;
  graphs)  # the same points with MLX's CUDA graphs on (default) and off (strictly serial launches)
    for g in 1 0; do
      MLX_USE_CUDA_GRAPHS=$g MLX_MOE_TUNE_TABLES="$TABLES" timeout "${LIMIT:-150}" python3 -m mlx_moe_tune.cli sweep \
        --shape 128,2816,1408,8 --m 1,4,16,64 --kernels 'stock.gather_qmm,tuned.auto' --quiet \
        -o "$OUT/graphs$g.csv" > "$OUT/graphs$g.log" 2>&1
    done ;;
esac
