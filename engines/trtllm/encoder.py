"""`--backend trtllm-encoder`, the product's intended shape: a TensorRT-LLM encoder engine replaces
the PyTorch encoder inside our Engine (its `encoder` hook); decoding stays ours: in-flight
batching, speculative drafts (hypothesis, Medusa), Whisper's rules. TensorRT-LLM has no
speculative decoding for Whisper (../shared/reference/tensorrt-llm.md §2), so this is the only way
to have both.

Everything TensorRT-LLM-specific is imported inside the functions that need it, and TrtEncoder
takes its session from outside, so the tests drive it with fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engines.config import BackendUnavailable, EngineConfig
from engines.whisper.audio import N_FRAMES

from .checks import encoder_config_problems, read_engine_config
from .self_test import self_test_encoder, self_test_pipeline

if TYPE_CHECKING:
    from engines.engine import Engine

log = logging.getLogger(__name__)


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
        parts = [self._run(chunk) for chunk in mel.split(self.max_batch)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
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


def load_encoder_engine(
    engine_dir: Path, model: str, device: str, config: EngineConfig, manifest: dict | None
) -> Engine:
    """The torch engine with TensorRT-LLM's encoder engine in its `encoder` hook, self-tested."""
    from engines.engine import Engine
    from engines.weights.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(model)
    engine_config = read_engine_config(engine_dir, "encoder")
    problems = encoder_config_problems(engine_config, checkpoint.dims)
    if problems:
        raise BackendUnavailable(f"{engine_dir}/encoder does not fit --model {model}:\n  - " + "\n  - ".join(problems))
    encoder = TrtEncoder.from_dir(engine_dir, device)
    engine = Engine(checkpoint, device=device, script=config.script, encoder=encoder, **config.engine_options())
    weight_only = ((manifest or {}).get("options") or {}).get("weight_only")
    try:
        finish_encoder_engine(engine, encoder, config.self_test, weight_only)
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
