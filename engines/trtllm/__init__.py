"""TensorRT-LLM backends for breeze-stream, pinned to TensorRT-LLM 1.2.x.

1.2.x is the last release line with the TensorRT-engine path (`convert_checkpoint.py` +
`trtllm-build` + the C++ Executor); 1.3+ removed it and runs Whisper on its PyTorch backend
through the `LLM` API instead (docs/trtllm.md). TensorRT-LLM offers no speculative decoding for
Whisper on either path, so the product's intended shape is `trtllm-encoder`: a TensorRT-LLM
encoder engine under our own PyTorch speculative decoder.

- `convert`: any checkpoint `load_checkpoint` reads -> an OpenAI-format `.pt` (what TensorRT-LLM's
  Whisper converter takes).
- `build`: the plan of `breeze-stream build-trtllm`: the checkpoint conversion and `trtllm-build`
  commands; `builder` runs it and writes a manifest of what was built.
- `checks`: what a backend lacks here (engine directory, TensorRT-LLM, GPU, versions), all at once.
- `self_test`: the start-up self-test on a generated clip.
- `encoder`: `--backend trtllm-encoder`, TensorRT-LLM's encoder engine under our PyTorch decoder.
- `executor`: `--backend trtllm`, the whole model on TensorRT-LLM's C++ Executor.

engines.backend.create_engine starts either (`--backend torch` is engines.engine.Engine).

Nothing here imports TensorRT-LLM at module level: `--dry-run`, the converter, the checks and
the tests run without it.
"""

TRTLLM_VERSION = "1.2.1"
"""The pinned TensorRT-LLM release (PyPI `tensorrt-llm==1.2.1`; NGC image below)."""
TRTLLM_SERIES = "1.2."
TRTLLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"
WHISPER_EXAMPLES = "/app/tensorrt_llm/examples/models/core/whisper"
"""Where the NGC release image keeps TensorRT-LLM's Whisper example (convert_checkpoint.py)."""
BACKENDS = ("torch", "trtllm-encoder", "trtllm")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "breeze-stream-trtllm/1"
VOCABULARY = "vocabulary.json"
