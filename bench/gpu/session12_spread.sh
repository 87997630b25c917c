#!/usr/bin/env bash
# The twelfth session's second device call (issue 20): the four engine figures of the GPU engine
# issue (regression check), then the sampled finals at 300 streams again beside the defaults (the
# run-to-run spread at this load was about 20%). Stashes the second weight piece.
# Usage on the device: bash bench/gpu/stash.sh && bash bench/gpu/session12_spread.sh   (carry .weights/p2)
set -u
OUT_ALL=$OUT
mkdir -p "$OUT_ALL/engine" "$OUT_ALL/socket"
(source bench/gpu/common.sh
 timeout 200 python3 -m bench.engine --shape large-v2 --random-weights --device cuda --batch 1,32,64 \
   --modes kernels,compile --compile-batch 1,64 --sections encoder,decoder --frames 1500 --short-window 0 \
   --sampled-clips "" --iters 10 --repeats 3 --json "$OUT_ALL/engine/regression.json" 2>&1 | tail -14)
M="--model random:large-v2 --admission off --workers 4"
OUT=$OUT_ALL/socket DURATION=30 WARM_STREAMS=100 WARM_S=10 bash bench/gpu/socket_load.sh \
  "def:$M|300" "s4:$M --padding-stride 4|300"
nvidia-smi --query-gpu=name --format=csv,noheader
