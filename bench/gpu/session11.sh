#!/usr/bin/env bash
# The eleventh session's one device call (device time is short and machine starts often fail):
# Medusa training steps on Breeze's shape (issue 24), then the socket server at 300-400 streams with
# early finals (the default since 21d4da4) against the same engine without them, and against call E's
# engine settings (16 rows, 1 s window buckets) with them (issue 20); the GPU tests last, if time is left.
# Usage on the device: bash bench/gpu/session11.sh   (carry .whl and .dev)
set -u
OUT_ALL=$OUT
mkdir -p "$OUT_ALL/medusa" "$OUT_ALL/socket" "$OUT_ALL/tests"
OUT=$OUT_ALL/medusa timeout 170 bash bench/gpu/medusa_breeze.sh 2>&1 | tail -12
M="--model random:large-v2 --admission off --workers 4"
OUT=$OUT_ALL/socket DURATION=30 WARM_STREAMS=100 WARM_S=10 bash bench/gpu/socket_load.sh \
  "def:$M|300" "noearly:$M --no-early-finals|300" "e16:$M --max-batch 16 --window-bucket 1|300 400"
OUT=$OUT_ALL/tests timeout 80 bash bench/gpu/gpu_tests.sh
nvidia-smi --query-gpu=name --format=csv,noheader
