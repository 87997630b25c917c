"""Which engine to start: the backend, the model, the device and the torch engine's options, as
the command line and the server configure them. Imports nothing heavy (engines/backend.py starts
the engine a config names)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

RANDOM_PREFIX = "random:"
"""`--model random:SHAPE`: random weights of a real shape, for load tests (engines/synthetic.py)."""


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here; the message lists every missing piece and its fix."""


@dataclass(frozen=True)
class EngineConfig:
    """Which backend runs which model where, and the torch engine's options (engines/options.py
    defines the command-line flags of the same names)."""

    model: str = "default"
    device: str = "auto"
    backend: str = "torch"  # torch | trtllm-encoder | trtllm (engines/trtllm/)
    script: str = "traditional"
    trtllm_engine_dir: str | Path | None = None
    self_test: bool = True  # the TensorRT-LLM backends' start-up self-test
    speculative: str | None = None  # draft sources; None: the engine's default for the device
    medusa: str | None = None  # Medusa heads file; None: the shipped heads where they fit the model
    fp32_weights: bool = False  # CPU: float32 products instead of fbgemm's fp16-packed weights
    cuda_graphs: str = "graph"  # CUDA: graph | compile (Inductor-fused regions inside the graphs) | off
    max_batch: int | None = None  # rows of the running batch; None: the engine's default for the device
    window_bucket: float | None = None  # seconds shortened encoder windows round up to; None: the default
    padding_stride: int | None = None  # full windows' padding sampled every N positions; None: the device's default

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> EngineConfig:
        """The config of parsed command-line arguments; options a command does not define keep their defaults."""
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in fields(cls) if given.get(f.name) is not None})

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of the torch engine (engines.engine.Engine) beyond model, device and
        script: only those that differ from the engine's defaults, so that a backend that ignores
        them logs only what was asked for."""
        options: dict[str, Any] = {}
        if self.speculative is not None:
            options["speculative"] = self.speculative
        if self.medusa is not None:
            options["medusa"] = self.medusa
        if self.fp32_weights:
            options["fp16_weights"] = False
        if self.max_batch is not None:
            options["max_batch"] = self.max_batch
        if self.window_bucket is not None:
            options["window_bucket"] = self.window_bucket
        if self.padding_stride is not None:
            options["padding_stride"] = self.padding_stride
        if self.cuda_graphs != "graph":
            from engines.gpu.cuda_graphs import GraphOptions

            options["cuda_graphs"] = False if self.cuda_graphs == "off" else GraphOptions(mode=self.cuda_graphs)
        return options
