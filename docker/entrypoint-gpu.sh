#!/usr/bin/env bash
# Entry point of docker/Dockerfile.gpu.
#   (no arguments) or serve flags   build the engines if $BREEZE_TRTLLM_ENGINE_DIR has none, then serve
#   build [build-trtllm flags]      only build them (compose's one-shot `engines` service)
#   any other command               run it (e.g. bash)
set -euo pipefail

engines="${BREEZE_TRTLLM_ENGINE_DIR:-/engines}"
backend="${BREEZE_BACKEND:-trtllm-encoder}"

build() {
    if [ -f "$engines/manifest.json" ]; then
        echo "breeze-stream: engines found in $engines (delete its manifest.json to rebuild)"
        return 0
    fi
    local args=(--model "${BREEZE_MODEL:-MediaTek-Research/Breeze-ASR-25}" --out "$engines")
    if [ "$backend" = "trtllm-encoder" ]; then
        args+=(--encoder-only)  # the PyTorch speculative decoder does the decoding
    fi
    # shellcheck disable=SC2206  # BREEZE_BUILD_ARGS is a list of flags, split on purpose
    args+=(${BREEZE_BUILD_ARGS:-} "$@")
    echo "breeze-stream: building TensorRT-LLM engines into $engines (first start only)"
    breeze-stream build-trtllm "${args[@]}"
}

case "${1:-}" in
    build)
        shift
        build "$@"
        ;;
    "" | -*)
        build
        exec breeze-stream serve --host 0.0.0.0 --port "${BREEZE_PORT:-8765}" --backend "$backend" \
            --trtllm-engine-dir "$engines" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
