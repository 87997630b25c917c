# Shared steps of the GPU calls (sourced): wheels, server start/stop, GPU sampling, result bundle.
# Run from the repository root on the device machine; $OUT is the folder that comes back.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
if [ -z "${LOCAL:-}" ]; then  # LOCAL=1: a dry run of the script on a machine with the project installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p "$OUT/r"
PORT=8765
URL=ws://127.0.0.1:$PORT/v1/stream
MANIFEST=${MANIFEST:-.dev/manifest.jsonl}

wait_healthy() {  # wait_healthy SECONDS: until /healthz answers 200
  python3 - "$1" <<'PY'
import sys, time, urllib.request
deadline = time.time() + float(sys.argv[1])
while time.time() < deadline:
    try:
        if urllib.request.urlopen("http://127.0.0.1:8765/healthz", timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(1)
PY
}

start_server() {  # start_server TAG ARGS...: serve in the background, log to $OUT/r/server-TAG.log
  local tag=$1; shift
  python3 -m breeze_stream serve --port $PORT --max-sessions 5000 --max-connections-per-client 0 "$@" \
    > "$OUT/r/server-$tag.log" 2>&1 &
  SERVER=$!
  wait_healthy ${HEALTHY_S:-150} || { echo "server $tag did not become healthy"; tail -30 "$OUT/r/server-$tag.log"; return 1; }
  echo "server $tag healthy after $SECONDS s of the call"
}

stop_server() {
  kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
  pkill -f "breeze_stream serve" 2>/dev/null; sleep 1
}

sample_gpu() {  # sample_gpu TAG: GPU utilisation every 0.5 s until stop_gpu
  [ -n "${LOCAL:-}" ] && { sleep 1000 & GPU_SAMPLER=$!; touch "$OUT/r/gpu-$1.csv"; return; }
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/r/gpu-$1.csv" &
  GPU_SAMPLER=$!
}
stop_gpu() { kill $GPU_SAMPLER 2>/dev/null; wait $GPU_SAMPLER 2>/dev/null; }

gpu_mean() {  # gpu_mean TAG: mean utilisation of the samples
  awk -F', ' '{gsub(/ %/,"",$2); s+=$2; n++} END {if (n) printf "%.0f%%", s/n}' "$OUT/r/gpu-$1.csv"
}

bundle() { tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"; }
