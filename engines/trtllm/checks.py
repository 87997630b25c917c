"""Start-up checks of the TensorRT-LLM backends: they name everything that is missing at once (the
engine directory or its files, TensorRT-LLM, a CUDA GPU, a version or GPU-architecture mismatch
with what built the engines), and whether an engine's config fits the checkpoint.

Engine directory layout (what `breeze-stream build-trtllm` writes; engines built by hand with
TensorRT-LLM's own recipe work too, minus the manifest checks): `encoder/{config.json,rank0.engine}`,
`decoder/{config.json,rank0.engine}` (the `trtllm` backend only), `manifest.json`,
`vocabulary.json`, `assets/large-v2.pt` (the checkpoint the PyTorch decoder loads).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import torch

from engines.config import BackendUnavailable
from engines.whisper.audio import N_FRAMES
from engines.whisper.model import ModelDims

from . import MANIFEST, TRTLLM_IMAGE, TRTLLM_SERIES, TRTLLM_VERSION


def components(backend: str) -> tuple[str, ...]:
    return ("encoder",) if backend == "trtllm-encoder" else ("encoder", "decoder")


def read_manifest(engine_dir: Path) -> dict | None:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(
            f"{path}: unreadable ({exc}); rebuild with `breeze-stream build-trtllm --force`"
        ) from None


def engine_dir_problems(engine_dir: Path | None, backend: str) -> list[str]:
    """What the engine directory lacks for `backend`."""
    build = "build them with `breeze-stream build-trtllm --model MODEL --out DIR" + (
        " --encoder-only`" if backend == "trtllm-encoder" else "`"
    )
    if engine_dir is None:
        return [f"--backend {backend} needs --trtllm-engine-dir DIR (or $BREEZE_TRTLLM_ENGINE_DIR): {build}"]
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        return [f"engine directory {engine_dir} does not exist: {build}"]
    missing = [
        f"{c}/{f}"
        for c in components(backend)
        for f in ("config.json", "rank0.engine")
        if not (engine_dir / c / f).is_file()
    ]
    problems = []
    if missing:
        problems.append(f"engine directory {engine_dir} is incomplete: no {', '.join(missing)} ({build})")
    manifest = read_manifest(engine_dir)
    if manifest is not None:
        built = manifest.get("components", [])
        lacking = [c for c in components(backend) if c not in built]
        if lacking:
            problems.append(
                f"{engine_dir} was built without the {' and '.join(lacking)} (--encoder-only?); "
                f"--backend {backend} needs it: rebuild without --encoder-only"
            )
    return problems


def trtllm_problems(
    find_spec=importlib.util.find_spec, import_module=importlib.import_module
) -> tuple[list[str], str | None]:
    """Whether TensorRT-LLM imports here, and its version."""
    fix = f"run in {TRTLLM_IMAGE} (docker/Dockerfile.gpu) or `pip install tensorrt-llm=={TRTLLM_VERSION}`"
    if find_spec("tensorrt_llm") is None:
        return [f"TensorRT-LLM is not installed (no module tensorrt_llm): {fix}"], None
    try:
        module = import_module("tensorrt_llm")
    except Exception as exc:  # noqa: BLE001 -- import failures of native libraries come in every type
        return [f"tensorrt_llm is installed but does not import ({type(exc).__name__}: {exc}): {fix}"], None
    version = str(getattr(module, "__version__", "unknown"))
    if not version.startswith(TRTLLM_SERIES):
        return [
            f"TensorRT-LLM {version} is installed; these backends are pinned to {TRTLLM_SERIES}x (1.3+ removed "
            f"the engine path): {fix}"
        ], version
    return [], version


def cuda_problems(device: str, cuda_available: Callable[[], bool] = torch.cuda.is_available) -> list[str]:
    if device == "cpu":
        return ["TensorRT-LLM runs on a CUDA GPU, but --device cpu was given: use --device cuda (or auto)"]
    if not cuda_available():
        return ["no CUDA GPU: PyTorch sees none (with Docker, run with --gpus all / the compose gpu profile)"]
    return []


def manifest_problems(manifest: dict | None, version: str | None, capability: tuple[int, int] | None) -> list[str]:
    """The engines must run on the TensorRT-LLM version and GPU architecture that built them."""
    if not manifest:
        return []
    problems = []
    built = (manifest.get("versions") or {}).get("tensorrt_llm")
    if built and version and built != version:
        problems.append(
            f"the engines were built with TensorRT-LLM {built} but {version} is installed; TensorRT engines "
            "only load in the version that built them: rebuild with `breeze-stream build-trtllm --force`"
        )
    gpus = manifest.get("gpus") or []
    cap = gpus[0].get("compute_cap") if gpus else None
    if cap and capability is not None and cap != f"{capability[0]}.{capability[1]}":
        problems.append(
            f"the engines were built for compute capability {cap} ({gpus[0].get('name', '?')}) but this GPU "
            f"is {capability[0]}.{capability[1]}: rebuild them on this GPU"
        )
    return problems


def check_environment(backend: str, engine_dir: str | Path | None, device: str = "auto") -> Path:
    """Raises BackendUnavailable listing everything missing for `backend`; the engine directory."""
    path = Path(engine_dir) if engine_dir is not None else None
    problems = engine_dir_problems(path, backend)  # names a missing directory
    trt, version = trtllm_problems()
    problems += trt
    cuda = cuda_problems(device)
    problems += cuda
    if not problems and path is not None:
        index = torch.device(device if device.startswith("cuda") else "cuda").index or 0
        problems += manifest_problems(read_manifest(path), version, torch.cuda.get_device_capability(index))
    if problems or path is None:
        raise BackendUnavailable(f"--backend {backend} cannot start:\n  - " + "\n  - ".join(problems))
    return path


def read_engine_config(engine_dir: Path, component: str) -> dict:
    """trtllm-build's `<component>/config.json`: {'pretrained_config': ..., 'build_config': ...}."""
    path = Path(engine_dir) / component / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(f"{path}: unreadable ({exc})") from None
    if "pretrained_config" not in config or "build_config" not in config:
        raise BackendUnavailable(f"{path}: not a trtllm-build engine config (no pretrained_config/build_config)")
    return config


def encoder_config_problems(config: dict, dims: ModelDims) -> list[str]:
    """Does the encoder engine fit the checkpoint that the PyTorch decoder loads?"""
    pre, build = config["pretrained_config"], config["build_config"]
    problems = []
    for key, want in (
        ("n_mels", dims.n_mels),
        ("hidden_size", dims.n_audio_state),
        ("num_hidden_layers", dims.n_audio_layer),
        ("num_attention_heads", dims.n_audio_head),
    ):
        if pre.get(key) != want:
            problems.append(f"encoder {key} {pre.get(key)} != the checkpoint's {want}")
    if build.get("max_input_len", 0) < N_FRAMES:
        problems.append(f"encoder max_input_len {build.get('max_input_len')} < {N_FRAMES} mel frames (30 s)")
    if pre.get("architecture") not in (None, "WhisperEncoder"):
        problems.append(f"encoder architecture {pre.get('architecture')!r} is not WhisperEncoder")
    return problems


def decoder_config_problems(config: dict, n_vocab: int) -> list[str]:
    pre, build = config["pretrained_config"], config["build_config"]
    plugins = build.get("plugin_config", {})
    problems = []
    if pre.get("vocab_size") != n_vocab:
        problems.append(f"decoder vocab_size {pre.get('vocab_size')} != the vocabulary's {n_vocab}")
    if build.get("max_encoder_input_len", 0) < N_FRAMES:
        problems.append(f"decoder max_encoder_input_len {build.get('max_encoder_input_len')} < {N_FRAMES}")
    for key in ("paged_kv_cache", "remove_input_padding"):
        if plugins.get(key) is False:
            problems.append(f"decoder built with {key} disabled; the Executor's in-flight batching needs it enabled")
    return problems
