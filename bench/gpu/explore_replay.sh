#!/usr/bin/env bash
# Issue 20, first look: Breeze-shape load mode (random:large-v2) through the socket server, one
# process against --workers 4, driven by 4 `replay` processes over the first 4 dev clips (25 s of speech).
# Usage on the device: bash bench/gpu/explore_replay.sh "200 300"
source bench/gpu/common.sh
replay_load() {  # replay_load TAG N LIMIT: N real-time streams from 4 replay processes, the first LIMIT clips
  local tag=$1 n=$2 limit=$3 pids=()
  for i in 1 2 3 4; do
    python3 -m breeze_stream replay "$MANIFEST" --url $URL --concurrency $((n / 4)) --limit $limit --stagger 0.05 \
      --no-progress --quiet --json "$OUT/r/$tag-$n-$i.json" > "$OUT/r/$tag-$n-$i.txt" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  echo "$tag N=$n: $(cat $OUT/r/$tag-$n-*.txt | tr '\n' ' ')"
}
for mode in "single:" "workers4:--workers 4"; do
  tag=${mode%%:*}; extra=${mode#*:}
  start_server $tag --model ${MODEL:-random:large-v2} --device ${DEVICE:-cuda} $extra || continue
  replay_load $tag-warm 200 2 > /dev/null
  for n in $1; do
    sample_gpu $tag-$n
    if [ "$n" = "${1##* }" ]; then  # the largest load: where the time goes
      (sleep 15; for p in $(pgrep -f "breeze_stream serve"); do timeout 20 py-spy record -r 40 -d 12 --format raw -o "$OUT/r/pyspy-$p.txt" --pid $p --nonblocking > /dev/null 2>&1 & done; wait) &
    fi
    replay_load $tag $n 4
    stop_gpu; echo "  GPU mean $(gpu_mean $tag-$n)"
  done
  stop_server
done
bundle
