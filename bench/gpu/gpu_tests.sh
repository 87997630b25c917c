#!/usr/bin/env bash
# The test files that exercise CUDA code paths (they skip on a CPU), run on the device's GPU: the row
# kernels, decode attention, CUDA graphs and fused regions after a refactor that has only run on a CPU.
# Usage on the device: bash bench/gpu/gpu_tests.sh
source bench/gpu/common.sh
python3 -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py tests/test_decode_attention.py \
  tests/test_cuda_graphs.py tests/test_fused.py 2>&1 | tee "$OUT/r/gpu-tests.txt" | tail -25
