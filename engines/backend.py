"""The engine contract: what every backend offers the server, and the one way to start one.

A backend decodes segments off the event loop and answers each with a Transcript, or None when a
newer partial of the same stream superseded it (engines/scheduling.py). Three satisfy `Backend`:
the torch engine (engines/engine.py), TensorRT-LLM's executor (engines/trtllm/executor.py) and
the engine of another process (streaming/server/workers.py's RemoteEngine). `create_engine` turns an
`EngineConfig` (engines/config.py: the `--backend`, `--model`, `--device` ... options) into the
first two, or into the torch engine on random weights of a real shape (`random:SHAPE`, engines/synthetic.py).

This module imports neither torch nor numpy at run time, so the command line can build a config
before anything heavy loads.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from engines.config import RANDOM_PREFIX, BackendUnavailable, EngineConfig

if TYPE_CHECKING:
    import numpy as np

    from engines.transcript import Transcript
    from engines.whisper.decoding import DecodingOptions

log = logging.getLogger(__name__)


@runtime_checkable
class Backend(Protocol):
    """What the server and the tools use of an engine (docs/architecture.md, the engine contract)."""

    @property
    def name(self) -> str: ...  # the model's name, for logs, /healthz and the protocols' session info

    @property
    def device(self) -> object: ...  # where it runs: torch.device or "cuda:0"-like text

    def submit(
        self,
        audio: np.ndarray,
        options: DecodingOptions = ...,
        *,
        window: float | None = None,
        previous: list[int] | None = None,
        speculative: str | None = None,
        final: bool = True,
        stream: object | None = None,
        words: bool = False,
    ) -> Future[Any]:
        """Queues one segment; the future gets a Transcript, or None for a superseded partial."""
        ...

    async def transcribe_async(
        self, audio: np.ndarray, options: DecodingOptions = ..., **kwargs: Any
    ) -> Transcript | None: ...

    def health(self) -> dict[str, Any]:
        """The worker's state for /healthz: `alive` at least; `restarts`, `last_error` where known."""
        ...

    def load_stats(self) -> dict[str, float]:
        """Running totals for /metrics (engines.engine.Engine.load_stats); {} where none are kept."""
        ...

    def close(self) -> None: ...


def create_engine(config: EngineConfig) -> Backend:
    """The backend `config` names, loaded; raises BackendUnavailable naming what is missing, and
    engines.trtllm.self_test.SelfTestFailed when a TensorRT-LLM backend gives wrong results.

    With a TensorRT-LLM backend, model "default" means the checkpoint the engines were built from
    (the manifest's), not the embedded whisper-base."""
    from engines.trtllm import BACKENDS

    if config.backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {config.backend!r}; use one of {', '.join(BACKENDS)}")
    if config.backend == "torch" and config.model.startswith(RANDOM_PREFIX):
        from engines.synthetic import random_engine

        log.warning("model %s: RANDOM WEIGHTS of that shape, for load tests; transcripts are meaningless", config.model)
        shape = config.model[len(RANDOM_PREFIX) :]
        return random_engine(shape, config.device, script=config.script, **config.engine_options())
    if config.backend == "torch":
        from engines.engine import Engine

        return Engine.load(config.model, device=config.device, script=config.script, **config.engine_options())
    from engines.trtllm.checks import check_environment, read_manifest
    from engines.trtllm.encoder import load_encoder_engine
    from engines.trtllm.executor import load_executor_engine

    engine_dir = check_environment(config.backend, config.trtllm_engine_dir, config.device)
    manifest = read_manifest(engine_dir)
    model = config.model
    if model == "default" and manifest and manifest.get("checkpoint"):
        model = str(engine_dir / manifest["checkpoint"])
        log.info("--model default with --backend %s: the engines' own checkpoint %s", config.backend, model)
    device = "cuda" if config.device == "auto" else config.device
    if config.backend == "trtllm-encoder":
        return load_encoder_engine(engine_dir, model, device, config, manifest)
    return load_executor_engine(engine_dir, model, config, manifest)
