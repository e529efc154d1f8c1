#!/usr/bin/env bash
# Issue 14 on the H200: the op vs its kernel alone (both layouts), bench-model (stock vs patched
# through mlx-lm's generate_step / BatchGenerator), the peers. Each device call runs
#   bash .dev/device/install-mlx-cuda.sh /tmp/mlx-site && export PYTHONPATH=/tmp/mlx-site:$PWD;
#   bash scripts/h200/issue14.sh STEP...
# with STEP one of: sweep, bench-qwen, bench-gemma, peers, gpu-tests. Results: $OUT/issue14.tgz
# (T_<STEP> seconds caps each step; N trials, G generated tokens per sequence).
set -u
R=${R:-/tmp/issue14}; mkdir -p "$R"; export PYTHONUNBUFFERED=1
MMT="python3 -m mlx_moe_tune.cli"
N=${N:-8}; G=${G:-64}
# MLX's NVRTC output from an earlier call (the ptx-cache step): skips minutes of compiles
[ -f .dev/ptx-cache.tgz ] && tar -C / -xzf .dev/ptx-cache.tgz && echo "PTX cache: $(ls /tmp/mlx/*/ptx | wc -l) entries"
bench() {  # arch tag
  timeout ${T_BENCH:-280} $MMT bench-model --arch "$1" --random --layers 16 -p 512,2048 -b 1,8,32,64 \
    --batch-prompt-tokens 128 -g "$G" -n "$N" --deadline $(( ${T_BENCH:-280} - 40 )) \
    --json "$R/bench-$2.json" --plot "$R/bench-$2.png" > "$R/bench-$2.log" 2>&1
  tail -n 25 "$R/bench-$2.log" | cut -c1-200
}
for step in "$@"; do
  echo "== $step $(date -u +%T)"
  case $step in
    sweep)
      timeout ${T_SWEEP:-260} $MMT sweep --preset gemma-26b-a4b --m 1..64 \
        --kernels 'tuned.auto*,tuned.pick*,stock.gather_qmm*,ref.bandwidth' \
        -o "$R/op-vs-kernel.csv" --quiet > "$R/sweep.log" 2>&1
      tail -n 5 "$R/sweep.log"
      $MMT report "$R/op-vs-kernel.csv" > "$R/op-vs-kernel.txt" 2>&1 || true
      python3 - "$R/op-vs-kernel.csv" <<'PY'
import sys, pandas as pd
df = pd.read_csv(sys.argv[1])
df = df[df.kernel.str.startswith(("tuned", "stock"))]
t = df.pivot_table(index=["matrix", "m"], columns="kernel", values="time_us", aggfunc="min")
print(t.round(1).to_string())
print(df[df.status != "ok"][["kernel", "m", "status"]].to_string() if (df.status != "ok").any() else "all ok")
PY
      ;;
    bench-qwen) bench qwen3_moe qwen3 ;;
    bench-gemma) bench gemma-26b-a4b gemma ;;
    profile-qwen)
      timeout ${T_PROFILE:-150} $MMT profile-step --arch qwen3_moe --random --layers 16 -b 1,8,64 -n 32 --trials 3 \
        --json "$R/profile-step-qwen3.json" > "$R/profile-step-qwen3.log" 2>&1; tail -n 12 "$R/profile-step-qwen3.log" | cut -c1-400 ;;
    gpu-tests-patch)
      timeout ${T_TESTS:-150} python3 -m pytest -m gpu tests/test_patch.py tests/test_bad_ids.py tests/test_ops.py -p no:cacheprovider \
        --timeout 140 -q > "$R/gpu-tests-patch.log" 2>&1; tail -n 8 "$R/gpu-tests-patch.log" | cut -c1-300 ;;
    ptx-cache) tar -C / -czf "$OUT/ptx-cache.tgz" tmp/mlx && ls -la "$OUT/ptx-cache.tgz" ;;
    peers) timeout ${T_PEERS:-150} python3 .dev/peers/h200_peers.py > "$R/peers.csv" 2> "$R/peers.log"; tail -n 3 "$R/peers.log" ;;
    gpu-tests)
      timeout ${T_TESTS:-240} python3 -m pytest -m gpu tests/ -p no:cacheprovider --timeout 200 -q \
        > "$R/gpu-tests.log" 2>&1; tail -n 15 "$R/gpu-tests.log" | cut -c1-200 ;;
    *) echo "unknown step $step" ;;
  esac
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$R/nvidia-smi.csv" 2>&1
tar -C "$(dirname "$R")" -czf "$OUT/issue14.tgz" "$(basename "$R")"
