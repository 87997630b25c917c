"""`--backend torch|trtllm-encoder|trtllm`: where the model runs.

- `torch` (default): engines.engine.Engine, all PyTorch.
- `trtllm-encoder`: the product's intended shape. A TensorRT-LLM encoder engine replaces the
  PyTorch encoder inside our Engine (its `encoder` hook); decoding stays ours: in-flight batching,
  speculative drafts (hypothesis, Medusa), Whisper's rules. TensorRT-LLM has no speculative
  decoding for Whisper (../shared/reference/tensorrt-llm.md §2), so this is the only way to have
  both.
- `trtllm`: the whole encoder-decoder in TensorRT-LLM's C++ Executor (its own in-flight batching,
  no speculation), for comparison. `ExecutorEngine` has Engine's surface (`submit`,
  `transcribe_async`, `transcribe`, `close`, `name`).

Start-up checks name everything that is missing at once (the engine directory or its files,
TensorRT-LLM, a CUDA GPU, a version or GPU-architecture mismatch with what built the engines).
Then a self-test: one short generated clip through the encoder (compared with the PyTorch
encoder on the same weights, `trtllm-encoder`) and through the whole pipeline.

Engine directory layout (what `breeze-stream build-trtllm` writes; engines built by hand with
TensorRT-LLM's own recipe work too, minus the manifest checks): `encoder/{config.json,rank0.engine}`,
`decoder/{config.json,rank0.engine}` (the `trtllm` backend only), `manifest.json`,
`vocabulary.json`, `assets/large-v2.pt` (the checkpoint the PyTorch decoder loads).

Everything TensorRT-LLM-specific is imported inside the functions that need it, and the classes
take their TensorRT-LLM objects from outside, so the tests drive them with fakes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import importlib.util
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engines.scheduling import superseded, window_frames
from engines.transcript import Transcript, shape_text
from engines.whisper.audio import FRAMES_PER_SECOND, N_FRAMES, SAMPLE_RATE, clip_mel, pad_mel
from engines.whisper.decoding import DecodingOptions, repetition_period, segment_prompt
from engines.whisper.model import ModelDims

from . import BACKENDS, MANIFEST, TRTLLM_IMAGE, TRTLLM_SERIES, TRTLLM_VERSION, VOCABULARY

log = logging.getLogger(__name__)

SELF_TEST_TIMEOUT = 120.0  # seconds for the pipeline self-test (first calls warm kernels up)
ENCODER_AGREEMENT = {None: 0.99, "int8": 0.97, "int4": 0.95}
"""Least mean cosine similarity between TensorRT-LLM's and PyTorch's encoder outputs on the
self-test clip, by weight-only precision. A guess from fp16 rounding, never measured on a GPU here."""


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here; the message lists every missing piece and its fix."""


class SelfTestFailed(RuntimeError):
    """The backend loaded but gave wrong or no results on the start-up clip."""


# ---- command line ------------------------------------------------------------------------------


def load_backend(args: argparse.Namespace, **engine_kwargs):
    """The engine that the parsed arguments ask for (streaming.cli's load_engine calls this).

    Reads `model`, `device`, and where present `script`, `backend`, `trtllm_engine_dir`,
    `self_test`; `engine_kwargs` go to Engine (torch and trtllm-encoder)."""
    return create_engine(
        getattr(args, "backend", "torch") or "torch",
        model=args.model,
        device=args.device,
        engine_dir=getattr(args, "trtllm_engine_dir", None),
        script=getattr(args, "script", "traditional"),
        self_test=getattr(args, "self_test", True),
        **engine_kwargs,
    )


def create_engine(
    backend: str = "torch",
    model: str = "default",
    device: str = "auto",
    engine_dir: str | Path | None = None,
    script: str = "traditional",
    self_test: bool = True,
    **engine_kwargs,
):
    """Engine (torch, trtllm-encoder) or ExecutorEngine (trtllm); raises BackendUnavailable
    naming what is missing, SelfTestFailed when the loaded backend gives wrong results.

    With a TensorRT-LLM backend, `model` "default" means the checkpoint the engines were built
    from (the manifest's), not the embedded whisper-base."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        from engines.engine import Engine

        return Engine.load(model, device=device, script=script, **engine_kwargs)
    engine_dir = check_environment(backend, engine_dir, device)
    manifest = read_manifest(engine_dir)
    if model == "default" and manifest and manifest.get("checkpoint"):
        model = str(engine_dir / manifest["checkpoint"])
        log.info("--model default with --backend %s: the engines' own checkpoint %s", backend, model)
    device = "cuda" if device == "auto" else device
    if backend == "trtllm-encoder":
        return _create_encoder_engine(engine_dir, model, device, script, self_test, manifest, engine_kwargs)
    unused = sorted(engine_kwargs)
    if unused:
        log.info("--backend trtllm ignores %s (TensorRT-LLM's Executor batches and decodes itself)", ", ".join(unused))
    engine = ExecutorEngine.from_dir(engine_dir, model=model, script=script, manifest=manifest)
    if self_test:
        try:
            self_test_pipeline(engine)
        except BaseException:
            engine.close()
            raise
    return engine


# ---- environment checks ------------------------------------------------------------------------


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
    problems = engine_dir_problems(Path(engine_dir) if engine_dir is not None else None, backend)
    trt, version = trtllm_problems()
    problems += trt
    cuda = cuda_problems(device)
    problems += cuda
    if not problems:
        index = torch.device(device if device.startswith("cuda") else "cuda").index or 0
        problems += manifest_problems(read_manifest(Path(engine_dir)), version, torch.cuda.get_device_capability(index))
    if problems:
        raise BackendUnavailable(f"--backend {backend} cannot start:\n  - " + "\n  - ".join(problems))
    return Path(engine_dir)


# ---- engine configuration ----------------------------------------------------------------------


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


# ---- the self-test clip ------------------------------------------------------------------------


def self_test_clip(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """A short, deterministic, speech-like signal: a voiced harmonic series with a gliding pitch and
    syllable-rate amplitude, plus a little noise. It exercises the whole front end; what the model
    makes of it does not matter (nothing here knows the right transcript)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * np.minimum(1, np.minimum(t, seconds - t) / 0.1)
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.3 * voice * envelope / np.abs(voice).max() + noise).astype(np.float32)


def encoder_agreement(reference: Callable, candidate: Callable, mel: torch.Tensor) -> float:
    """Mean cosine similarity over frames of two encoders' outputs on the same mel [B, n_mels, T]."""
    with torch.inference_mode():
        a, b = reference(mel), candidate(mel)
    if a.shape != b.shape:
        raise SelfTestFailed(f"encoder output shape {tuple(b.shape)} != PyTorch's {tuple(a.shape)}")
    if not torch.isfinite(b).all():
        raise SelfTestFailed("encoder output holds NaN or infinity")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def self_test_encoder(engine, encoder: Callable, weight_only: str | None = None) -> list[float]:
    """TensorRT-LLM's encoder against the PyTorch encoder of the same weights on the self-test clip:
    the full 30 s window and a shortened one (the engine runs both)."""
    dims = engine.model.dims
    mel = clip_mel(self_test_clip(), dims.n_mels)
    threshold = ENCODER_AGREEMENT.get(weight_only, 0.95)
    scores = []
    for frames in (N_FRAMES, 2 * math.ceil((mel.shape[-1] + 2 * FRAMES_PER_SECOND) / 2)):
        batch = pad_mel(mel, frames)[None].to(engine.device, engine.dtype)
        score = encoder_agreement(engine.model.encoder, encoder, batch)
        scores.append(score)
        if score < threshold:
            raise SelfTestFailed(
                f"TensorRT-LLM's encoder disagrees with PyTorch's on the self-test clip ({frames} mel "
                f"frames): mean cosine similarity {score:.4f} < {threshold}"
            )
    return scores


def self_test_pipeline(engine, timeout: float = SELF_TEST_TIMEOUT):
    """One decode of the self-test clip end to end: it must finish, in time, with valid tokens."""
    started = time.perf_counter()
    future = engine.submit(self_test_clip(), DecodingOptions(language="zh", max_new_tokens=32))
    try:
        transcript = future.result(timeout=timeout)
    except FutureTimeout:
        raise SelfTestFailed(f"the self-test clip was not decoded within {timeout:g} s") from None
    except Exception as exc:
        raise SelfTestFailed(f"decoding the self-test clip failed: {type(exc).__name__}: {exc}") from exc
    n_vocab = len(engine.tokenizer.vocabulary)
    if transcript is None or any(not 0 <= t < n_vocab for t in transcript.tokens):
        raise SelfTestFailed(f"the self-test decode returned {transcript!r}")
    log.info(
        "self-test passed: %d tokens in %.2f s (%r)",
        len(transcript.tokens),
        time.perf_counter() - started,
        transcript.text[:40],
    )
    return transcript


# ---- trtllm-encoder ----------------------------------------------------------------------------


class TrtEncoder:
    """TensorRT-LLM's Whisper encoder engine as a callable: mel [B, n_mels, T] -> features [B, T/2, D].

    Inputs as TensorRT-LLM 1.2's examples/models/core/whisper/run.py feeds the engine:
    `input_features` (with remove_input_padding, the default: the batch packed to [B*T, n_mels];
    otherwise [B, n_mels, T]), `input_lengths` [B] (mel frames), `position_ids` (0..T/2-1 per
    clip, packed the same way); output `encoder_output` ([B*T/2, D] packed). Batches larger than
    the engine's max_batch_size run in slices."""

    def __init__(self, config: dict, session=None, device: str | torch.device = "cuda"):
        build = config["build_config"]
        self.config = config
        self.session = session
        self.device = torch.device(device)
        self.max_batch = int(build.get("max_batch_size", 1))
        self.max_frames = int(build.get("max_input_len", N_FRAMES))
        self.remove_padding = bool(build.get("plugin_config", {}).get("remove_input_padding", True))
        self.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
            config["pretrained_config"].get("dtype", "float16")
        ]

    @classmethod
    def from_dir(cls, engine_dir: Path, device: str | torch.device = "cuda") -> TrtEncoder:
        from tensorrt_llm.runtime.session import Session

        config = read_engine_config(engine_dir, "encoder")
        device = torch.device(device)
        if device.index is not None:
            torch.cuda.set_device(device)  # the engine deserialises onto the current device
        with open(Path(engine_dir) / "encoder" / "rank0.engine", "rb") as f:
            session = Session.from_serialized_engine(f.read())
        return cls(config, session, device)

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.shape[-1] > self.max_frames or mel.shape[-1] % 2:
            raise ValueError(
                f"encoder input of {mel.shape[-1]} mel frames: the engine takes an even number up to {self.max_frames}"
            )
        out = [self._run(chunk) for chunk in mel.split(self.max_batch)]
        out = out[0] if len(out) == 1 else torch.cat(out)
        return out.to(mel.dtype)  # the decoder's dtype, whatever precision the engine was built in

    def pack(self, mel: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n_mels, t = mel.shape
        mel = mel.to(self.device, self.dtype)
        lengths = torch.full((b,), t, dtype=torch.int32, device=self.device)
        positions = torch.arange(t // 2, dtype=torch.int32, device=self.device).expand(b, -1)
        if self.remove_padding:
            return {
                "input_features": mel.transpose(1, 2).reshape(b * t, n_mels).contiguous(),
                "input_lengths": lengths,
                "position_ids": positions.reshape(-1).contiguous(),
            }
        return {"input_features": mel.contiguous(), "input_lengths": lengths, "position_ids": positions.contiguous()}

    def _run(self, mel: torch.Tensor) -> torch.Tensor:
        b, _, t = mel.shape
        output = self.execute(self.pack(mel))["encoder_output"]
        return output.reshape(b, t // 2, output.shape[-1])

    def execute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One engine run (the TensorRT-LLM Session API of run.py's WhisperEncoding)."""
        from tensorrt_llm._utils import torch_dtype_to_trt, trt_dtype_to_torch
        from tensorrt_llm.runtime.session import TensorInfo

        infos = [
            TensorInfo(name, torch_dtype_to_trt(tensor.dtype), tuple(tensor.shape)) for name, tensor in inputs.items()
        ]
        outputs = {
            info.name: torch.empty(tuple(info.shape), dtype=trt_dtype_to_torch(info.dtype), device=self.device)
            for info in self.session.infer_shapes(infos)
        }
        stream = torch.cuda.current_stream(self.device)
        if not self.session.run(inputs=inputs, outputs=outputs, stream=stream.cuda_stream):
            raise RuntimeError("TensorRT-LLM encoder engine execution failed")
        stream.synchronize()
        return outputs


def _create_encoder_engine(
    engine_dir: Path, model: str, device: str, script: str, self_test: bool, manifest: dict | None, engine_kwargs: dict
):
    from engines.engine import Engine
    from engines.weights.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(model)
    config = read_engine_config(engine_dir, "encoder")
    problems = encoder_config_problems(config, checkpoint.dims)
    if problems:
        raise BackendUnavailable(f"{engine_dir}/encoder does not fit --model {model}:\n  - " + "\n  - ".join(problems))
    encoder = TrtEncoder.from_dir(engine_dir, device)
    engine = Engine(checkpoint, device=device, script=script, encoder=encoder, **engine_kwargs)
    try:
        finish_encoder_engine(engine, encoder, self_test, ((manifest or {}).get("options") or {}).get("weight_only"))
    except BaseException:
        engine.close()
        raise
    return engine


def finish_encoder_engine(engine, encoder: Callable, self_test: bool, weight_only: str | None = None):
    """Self-test an Engine whose encoder hook is `encoder`, then free the PyTorch encoder's weights
    (1.3 GB in fp16 for the Breeze shape): from here on only the engine's encoder runs."""
    if self_test:
        scores = self_test_encoder(engine, encoder, weight_only)
        log.info(
            "self-test: TensorRT-LLM encoder agrees with PyTorch's (mean cosine %s)",
            ", ".join(f"{s:.4f}" for s in scores),
        )
        self_test_pipeline(engine)
    engine.backend = "trtllm-encoder"
    engine.model.encoder.to("meta")
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return engine


# ---- trtllm: TensorRT-LLM's Executor for the whole model ---------------------------------------


@dataclass(eq=False)
class _Pending:
    future: Future
    audio: np.ndarray
    options: DecodingOptions
    window: float | None
    final: bool
    stream: object | None
    prompt: list[int]
    seq: int
    frames: int = 0
    request_id: int | None = None
    started: float = 0.0


class ExecutorEngine:
    """The whole encoder-decoder on TensorRT-LLM's C++ Executor (`tensorrt_llm.bindings.executor`).

    Same surface as Engine. Each request is one Executor request: the decoder prompt, the clip's
    log-mel as `encoder_input_features` [T, n_mels] and `encoder_output_length` T/2, greedy or beam
    search inside TensorRT-LLM. The suppressed tokens go in as single-token `bad_words`. Not
    available on this path: language detection, timestamps, the no-speech probability (reported
    as 0), speculative drafts. A newer partial of the same stream cancels the older one, as in
    Engine."""

    def __init__(
        self,
        executor,
        bindings,
        *,
        name: str,
        vocabulary: list[str],
        suppress_tokens: list[int],
        n_mels: int = 80,
        max_seq_len: int = 448,
        max_input_len: int = 14,
        max_beam_width: int = 1,
        script: str = "traditional",
        window_bucket: float = 1.0,
        device: str = "cuda",
        poll_seconds: float = 0.01,
    ):
        from engines.whisper.tokenizer import Tokenizer

        self.executor = executor
        self.trtllm = bindings
        self.name = name
        self.backend = "trtllm"
        self.device = torch.device(device)
        self.tokenizer = Tokenizer(vocabulary)
        self.suppress_tokens = sorted(set(suppress_tokens))
        self.n_mels = n_mels
        self.max_seq_len = max_seq_len
        self.max_input_len = (
            max_input_len  # the decoder engine's longest prompt: a previous-text prompt is trimmed to fit
        )
        self.max_beam_width = max_beam_width
        self.script = script
        self.window_bucket = window_bucket
        self.poll = datetime.timedelta(seconds=poll_seconds)
        self._incoming: list[_Pending] = []
        self._running: dict[int, _Pending] = {}
        self._latest: dict[object, int] = {}  # stream -> seq of its newest partial
        self._seq = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="breeze-trtllm-executor", daemon=True)
        self._worker.start()

    @classmethod
    def from_dir(
        cls,
        engine_dir: Path,
        *,
        model: str = "default",
        script: str = "traditional",
        manifest: dict | None = None,
        kv_cache_free_gpu_memory_fraction: float = 0.5,
        cross_kv_cache_fraction: float = 0.5,
    ) -> ExecutorEngine:
        import tensorrt_llm.bindings.executor as trtllm

        vocabulary, suppress, name = _vocabulary(engine_dir, model, manifest)
        encoder = read_engine_config(engine_dir, "encoder")
        decoder = read_engine_config(engine_dir, "decoder")
        problems = decoder_config_problems(decoder, len(vocabulary))
        if problems:
            raise BackendUnavailable(f"{engine_dir}/decoder:\n  - " + "\n  - ".join(problems))
        build = decoder["build_config"]
        # cross_kv_cache_fraction is required for encoder-decoder models ("Must set crossKvCacheFraction")
        kv_cache = trtllm.KvCacheConfig(
            free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction, cross_kv_cache_fraction=cross_kv_cache_fraction
        )
        config = trtllm.ExecutorConfig(
            max_batch_size=build["max_batch_size"],
            max_beam_width=build.get("max_beam_width", 1),
            kv_cache_config=kv_cache,
        )
        executor = trtllm.Executor(
            Path(engine_dir) / "encoder", Path(engine_dir) / "decoder", trtllm.ModelType.ENCODER_DECODER, config
        )
        return cls(
            executor,
            trtllm,
            name=name,
            vocabulary=vocabulary,
            suppress_tokens=suppress,
            n_mels=encoder["pretrained_config"].get("n_mels", 80),
            max_seq_len=build["max_seq_len"],
            max_input_len=build.get("max_input_len", 14),
            max_beam_width=build.get("max_beam_width", 1),
            script=script,
        )

    # -- Engine's surface ----------------------------------------------------------------------

    def submit(
        self,
        audio: np.ndarray,
        options: DecodingOptions = DecodingOptions(),
        *,
        window: float | None = None,
        previous: list[int] | None = None,
        speculative: str | None = None,
        final: bool = True,
        stream: object | None = None,
    ) -> Future:
        """Queues one segment; `previous` and `speculative` are accepted and ignored (no drafts here)."""
        if options.language is None:
            raise ValueError("--backend trtllm cannot detect the language: name one (e.g. --language zh)")
        if options.timestamps:
            raise ValueError(
                "--backend trtllm decodes without timestamps (TensorRT-LLM has no Whisper timestamp rules)"
            )
        if options.beam_size > self.max_beam_width:
            raise ValueError(
                f"beam size {options.beam_size} > the decoder engine's max_beam_width {self.max_beam_width}"
            )
        start = len(self.tokenizer.prompt(options.language, options.task, False))
        prompt, _ = segment_prompt(
            self.tokenizer, options.language, options, self.max_seq_len, max_text=self.max_input_len - start - 1
        )  # 1: <|startofprev|>
        pending = _Pending(Future(), np.asarray(audio, dtype=np.float32), options, window, final, stream, prompt, 0)
        with self._lock:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._seq += 1
            pending.seq = self._seq
            if not final and stream is not None:
                self._latest[stream] = pending.seq
            self._incoming.append(pending)
            self._wake.notify()
        return pending.future

    async def transcribe_async(self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **kwargs):
        return await asyncio.wrap_future(self.submit(audio, options, **kwargs))

    def transcribe(self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **kwargs):
        return self.submit(audio, options, **kwargs).result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._worker.join(timeout=60)
        shutdown = getattr(self.executor, "shutdown", None)
        if shutdown is not None:
            shutdown()

    # -- the worker ----------------------------------------------------------------------------

    def frames(self, pending: _Pending) -> int:
        """Mel frames of the encoder input: Engine's rule (engines/scheduling.py)."""
        return window_frames(len(pending.audio), pending.window, self.window_bucket)

    def request(self, pending: _Pending):
        """The Executor request of one segment (TensorRT-LLM 1.2 binding keywords, as ModelRunnerCpp uses them)."""
        t = self.trtllm
        pending.frames = self.frames(pending)
        mel = pad_mel(clip_mel(pending.audio, self.n_mels), pending.frames)  # [n_mels, T]
        features = mel.T.contiguous().to(self.device, torch.float16)  # [T, n_mels]
        max_tokens = max(1, min(pending.options.max_new_tokens, self.max_seq_len - len(pending.prompt)))
        return t.Request(
            input_token_ids=pending.prompt,
            max_tokens=max_tokens,
            streaming=False,
            sampling_config=t.SamplingConfig(beam_width=pending.options.beam_size),
            output_config=t.OutputConfig(return_log_probs=True, exclude_input_from_output=True),
            end_id=self.tokenizer.eot,
            pad_id=self.tokenizer.eot,
            bad_words=[[token] for token in self.suppress_tokens] or None,
            encoder_input_features=features,
            encoder_output_length=pending.frames // 2,
        )

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._incoming and not self._running and not self._closed:
                    self._wake.wait()  # idle: nothing to enqueue, nothing to wait for
                incoming, self._incoming = self._incoming, []
                latest = dict(self._latest)
                if self._closed and not incoming and not self._running:
                    return
            self._supersede(incoming, latest)
            for pending in incoming:
                if pending.future.done() or not pending.future.set_running_or_notify_cancel():
                    continue
                try:
                    pending.started = time.perf_counter()
                    pending.request_id = self.executor.enqueue_request(self.request(pending))
                except Exception as exc:  # noqa: BLE001 -- one bad request must not stop the others
                    pending.future.set_exception(exc)
                    continue
                with self._lock:
                    self._running[pending.request_id] = pending
            if not self._running:
                continue
            try:
                responses = self.executor.await_responses(timeout=self.poll)
            except Exception as exc:  # noqa: BLE001
                log.exception("TensorRT-LLM executor failed")
                with self._lock:
                    running, self._running = self._running, {}
                for pending in running.values():
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for response in responses:
                self._respond(response)

    def _supersede(self, incoming: list[_Pending], latest: dict[object, int]) -> None:
        """Partials that a newer partial of their stream replaced: answered None (queued ones never
        start, running ones are cancelled in the Executor)."""
        for pending in incoming:
            if superseded(pending, latest):
                pending.future.set_result(None)
        with self._lock:
            stale = [p for p in self._running.values() if superseded(p, latest)]
            for pending in stale:
                del self._running[pending.request_id]
        for pending in stale:
            try:
                self.executor.cancel_request(pending.request_id)
            except Exception:  # noqa: BLE001 -- it may have finished meanwhile
                log.debug("cancel of request %s failed", pending.request_id, exc_info=True)
            if not pending.future.done():
                pending.future.set_result(None)

    def _respond(self, response) -> None:
        with self._lock:
            pending = self._running.get(response.request_id)
            if pending is None:  # cancelled (superseded) earlier
                return
            if response.has_error() or response.result.is_final:
                del self._running[response.request_id]
        if response.has_error():
            pending.future.set_exception(RuntimeError(f"TensorRT-LLM: {response.error_msg}"))
        elif response.result.is_final:
            try:
                pending.future.set_result(self.transcript(pending, response.result))
            except Exception as exc:  # noqa: BLE001
                pending.future.set_exception(exc)

    def transcript(self, pending: _Pending, result):
        tokens = list(result.output_token_ids[0])
        if tokens[: len(pending.prompt)] == pending.prompt:  # in case the input was not excluded
            tokens = tokens[len(pending.prompt) :]
        ended = self.tokenizer.eot in tokens
        if ended:
            tokens = tokens[: tokens.index(self.tokenizer.eot)]
        log_probs = list(result.log_probs[0]) if getattr(result, "log_probs", None) else []
        avg_logprob = float(sum(log_probs[: len(tokens) + ended]) / max(1, len(tokens) + ended)) if log_probs else 0.0
        language = pending.options.language
        return Transcript(
            text=shape_text(self.tokenizer.decode(tokens), language, self.script),
            tokens=tokens,
            language=language,
            no_speech_prob=0.0,
            avg_logprob=avg_logprob,
            looped=repetition_period(tokens) > 0,
            window_frames=pending.frames,
            encoder_seconds=0.0,
            decoder_seconds=time.perf_counter() - pending.started,
            forwards=len(tokens) + ended,
        )


def _vocabulary(engine_dir: Path, model: str, manifest: dict | None) -> tuple[list[str], list[int], str]:
    """Vocabulary, suppressed tokens and name for the trtllm backend: the engine directory's own
    (build-trtllm writes them), else the checkpoint --model names, else the embedded default's."""
    path = Path(engine_dir) / VOCABULARY
    if path.is_file() and manifest:
        return (
            json.loads(path.read_text(encoding="utf-8")),
            list(manifest.get("suppress_tokens") or []),
            manifest.get("name") or str(engine_dir),
        )
    from engines.weights.checkpoints import SPECIAL_SUPPRESS, default_suppress_ids, default_vocabulary, load_checkpoint

    if model != "default":
        checkpoint = load_checkpoint(model)
        return checkpoint.vocabulary, checkpoint.suppress_tokens, checkpoint.name
    vocabulary = default_vocabulary()  # whisper's multilingual vocabulary, as for an OpenAI .pt
    special = [vocabulary.index(token) for token in SPECIAL_SUPPRESS if token in vocabulary]
    return vocabulary, sorted(set(default_suppress_ids()) | set(special)), str(engine_dir)
