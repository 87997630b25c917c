#!/usr/bin/env bash
# The twelfth session's last device call (issue 20): the embedded whisper-base with its real weights
# (installed from the three stashed pieces) offline on the dev set with the full and the sampled
# window, then through the socket server at 1, 50, 150 and 300 streams with finals on the sampled window.
# Usage on the device: bash bench/gpu/stash.sh install && bash bench/gpu/session12_base.sh   (carry .weights/p3)
set -u
OUT_ALL=$OUT
mkdir -p "$OUT_ALL/eval" "$OUT_ALL/socket"
(source bench/gpu/common.sh
 for stride in 1 4; do
   timeout 150 python3 -m breeze_stream eval "$MANIFEST" --device cuda --padding-stride $stride \
     --json "$OUT_ALL/eval/stride$stride.json" 2>&1 | tail -1
 done)
OUT=$OUT_ALL/socket DURATION=30 WARM_STREAMS=50 WARM_S=10 bash bench/gpu/socket_load.sh \
  "base4:--model default --workers 4 --padding-stride 4|1 50 150 300"
nvidia-smi --query-gpu=name --format=csv,noheader
