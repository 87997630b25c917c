#!/usr/bin/env bash
# Issue 20: N real-time streams through the socket server on one GPU, driven by bench-load.
# Usage on the device: bash bench/gpu/socket_load.sh "TAG:SERVE ARGS|N1 N2 ..." ...
#   e.g. bash bench/gpu/socket_load.sh "single:--model random:large-v2|200" "w4:--model random:large-v2 --workers 4|200 300"
# Each spec starts a server, warms it up (WARM_STREAMS streams for WARM_S s, not measured), then
# runs bench-load at each N for DURATION s; py-spy samples every server process during the last N.
source bench/gpu/common.sh
DURATION=${DURATION:-40}
WARM_STREAMS=${WARM_STREAMS:-200}  # 0: no warm-up load
WARM_S=${WARM_S:-25}
CLIENTS=${CLIENTS:-4}
load() {  # load TAG N SECONDS
  python3 -m breeze_stream bench-load "$MANIFEST" --url $URL --streams $2 --duration $3 --processes $(( $2 < CLIENTS ? $2 : CLIENTS )) --language zh \
    --quiet --json "$OUT/r/load-$1-$2.json" 2> "$OUT/r/load-$1-$2.err"
}
profile() {  # profile TAG: 12 s of py-spy on every server process, 15 s from now
  sleep 15
  for p in $SERVER $(pgrep -P $SERVER -f multiprocessing.spawn); do  # the server, or the engine process and its workers
    timeout 25 py-spy record -r 50 -d 12 --nonblocking --format raw -o "$OUT/r/pyspy-$1-$p.txt" --pid $p > /dev/null 2>&1 &
  done
  wait
}
for spec in "$@"; do
  tag=${spec%%:*}; rest=${spec#*:}; args=${rest%%|*}; counts=${rest#*|}
  start_server $tag --device ${DEVICE:-cuda} $args || continue
  [ "$WARM_STREAMS" -gt 0 ] && load $tag-warm $WARM_STREAMS $WARM_S > /dev/null
  for n in $counts; do
    profiler=""
    if [ "$n" = "${counts##* }" ]; then profile $tag-$n & profiler=$!; fi
    sample_gpu $tag-$n
    result=$(load $tag $n $DURATION)
    stop_gpu
    echo "$tag N=$n: $result gpu=$(gpu_mean $tag-$n)"
    [ -n "$profiler" ] && wait $profiler
  done
  stop_server
done
bundle
