#!/usr/bin/env bash
# The twelfth session's first device call (issue 20): the CUDA graph tests (the sampled window's
# among them), then the socket server at 300 streams with finals on the sampled window (--padding-stride 4) against
# the GPU defaults (finals on the full window) in the same run. Stashes the first weight piece.
# Usage on the device: bash bench/gpu/stash.sh && bash bench/gpu/session12.sh   (carry .whl .dev .weights/p1)
set -u
OUT_ALL=$OUT
mkdir -p "$OUT_ALL/socket"
(source bench/gpu/common.sh  # the CUDA graph tests, the sampled window's among them (the full set: gpu_tests.sh)
 timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -5)
M="--model random:large-v2 --admission off --workers 4"
OUT=$OUT_ALL/socket DURATION=30 WARM_STREAMS=100 WARM_S=10 bash bench/gpu/socket_load.sh \
  "s4:$M --padding-stride 4|300" "def:$M|300"
nvidia-smi --query-gpu=name --format=csv,noheader
