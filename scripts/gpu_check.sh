#!/usr/bin/env bash
# The one prepared GPU run (device machine): kernel tests on CUDA, then `outlierq bench` on H200
# shapes. Writes what it measured to ${OUT:-results/kernels}. Budget: under 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/kernels}
mkdir -p "$out"
python3 -c "import torch, triton; assert torch.cuda.is_available(); print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
pip install -q --no-deps --no-build-isolation -e .  # maps kernels/ to outlierq.kernels
unset TRITON_INTERPRET
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_ops.py tests/test_quantize.py 2>&1 | tee "$out/gpu_tests.log"
python3 -m outlierq bench kernels --device cuda --shapes 2048x576,8192x4096,16384x8192 \
  --dtypes fp32,bf16 --budget 0.5 --out "$out" 2>&1 | tee "$out/gpu_bench.log"
python3 scripts/bench_gemm.py --device cuda --shapes 4096x4096x4096,8192x8192x8192 --budget 0.5 \
  --out "$out" 2>&1 | tee "$out/gpu_gemm.log"
