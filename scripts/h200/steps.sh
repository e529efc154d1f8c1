#!/usr/bin/env bash
# The steps the H200 call scripts share, sourced by them. Each writes under $R; the T_* variables
# are the steps' time limits. A step cut by its limit leaves its partial logs.

# End to end, stock vs patched, on a 4-layer random model with gemma's MoE shape (bench-model; the
# python -m mlx_moe_tune.e2e of earlier calls). --deadline leaves it time to write the JSON.
step_e2e() {
  timeout ${T_E2E:-90} python3 -m mlx_moe_tune.cli bench-model --arch gemma-26b-a4b --random --layers 4 \
    -p 512 -g 32 -n 3 --deadline $(( ${T_E2E:-90} - 20 )) --json "$R/e2e-gemma-26b-a4b.json" > "$R/e2e.log" 2>&1
}

# The op (tuned.auto) vs stock for the skewed and sparse routers, N=1408.
step_routers() {
  for r in skewed sparse; do
    timeout ${T_ROUTER:-45} python3 -m mlx_moe_tune.cli sweep --shape 128,2816,1408,8 --m 1..64x2 --iters 15 --quiet \
      --router $r --kernels 'stock.gather_qmm,tuned.auto' -o "$R/router-$r.csv" > "$R/router-$r.log" 2>&1
  done
}

# Tune into $TABLES with the measurement cache $CACHE; the arguments pick the shapes
# (--preset NAME or --shape E,K,N,TOPK plus the format).
step_tune() {
  timeout ${T_TUNE:-270} python3 -m mlx_moe_tune.cli tune "$@" --m 1..64x2 --backend cuda \
    --table "$TABLES" --cache "$CACHE" -o "$R/tune" --deadline ${DEADLINE:-240} > "$R/tune.log" 2>&1
  cp -r "$TABLES" "$R/tables"
}
