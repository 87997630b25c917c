#!/usr/bin/env bash
# The twelfth session's first device call (issue 20): the CUDA graph tests (the sampled window's
# among them), the encoder on Breeze's shape with the padding sampled against the full window, then
# the socket server at 300 streams with finals on the sampled window (--padding-stride 4) against
# the GPU defaults (finals on the full window) in the same run. Stashes the first weight piece.
# Usage on the device: bash bench/gpu/stash.sh && bash bench/gpu/session12.sh   (carry .whl .dev .weights/p1)
set -u
OUT_ALL=$OUT
mkdir -p "$OUT_ALL/encoder" "$OUT_ALL/socket"
(source bench/gpu/common.sh  # the CUDA graph tests, the sampled window's among them (the full set: gpu_tests.sh)
 timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -5)
(source bench/gpu/common.sh
 for stride in 4; do
   timeout 60 python3 -m bench.engine --shape large-v2 --random-weights --device cuda --batch 1,8 \
     --sections encoder --short-window 0 --sampled-clips 3,10 --padding-stride $stride --iters 10 --repeats 3 \
     --json "$OUT_ALL/encoder/stride$stride.json" 2>&1 | grep -E "encoder|sampled" | head -20
 done)
M="--model random:large-v2 --admission off --workers 4"
OUT=$OUT_ALL/socket DURATION=30 WARM_STREAMS=100 WARM_S=10 bash bench/gpu/socket_load.sh \
  "s4:$M --padding-stride 4|300" "def:$M|300"
nvidia-smi --query-gpu=name --format=csv,noheader
