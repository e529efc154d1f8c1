#!/usr/bin/env bash
# Set up a virtual environment (CPU backend) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$(uname -s)" = Linux ]; then
  # NVIDIA's NVRTC wheels (Linux only): the CUDA kernels also compile for sm_90a here, and the
  # NVRTC tests must run, not skip
  .venv/bin/python -m pip install -q -e ".[cpu,test,nvrtc,metalcheck]"
  export MLX_MOE_TUNE_REQUIRE_NVRTC=1
else
  .venv/bin/python -m pip install -q -e ".[cpu,test,metalcheck]"
fi
# clang from the ziglang wheel: the Metal front-end check (tests/test_metal_check.py) must run
export MLX_MOE_TUNE_REQUIRE_CLANG=1
.venv/bin/python -m pytest -q "$@"
