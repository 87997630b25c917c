"""`--backend trtllm`: the whole encoder-decoder in TensorRT-LLM's C++ Executor (its own in-flight
batching, no speculation), for comparison with `trtllm-encoder` (engines/trtllm/encoder.py).
`ExecutorEngine` satisfies engines.backend.Backend and schedules by engines/scheduling.py's rules.

Everything TensorRT-LLM-specific is imported inside the functions that need it, and the class
takes its TensorRT-LLM objects from outside, so the tests drive it with fakes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.config import BackendUnavailable, EngineConfig
from engines.scheduling import superseded, window_frames
from engines.transcript import Transcript, shape_text
from engines.whisper.audio import clip_mel, pad_mel
from engines.whisper.decoding import DecodingOptions, repetition_period, segment_prompt

from . import VOCABULARY
from .checks import decoder_config_problems, read_engine_config
from .self_test import self_test_pipeline

log = logging.getLogger(__name__)


def load_executor_engine(engine_dir: Path, model: str, config: EngineConfig, manifest: dict | None) -> ExecutorEngine:
    """The Executor on the engines of `engine_dir`, self-tested unless `config` says not to."""
    unused = sorted(config.engine_options())
    if unused:
        log.info("--backend trtllm ignores %s (TensorRT-LLM's Executor batches and decodes itself)", ", ".join(unused))
    engine = ExecutorEngine.from_dir(engine_dir, model=model, script=config.script, manifest=manifest)
    if config.self_test:
        try:
            self_test_pipeline(engine)
        except BaseException:
            engine.close()
            raise
    return engine


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
    language: str  # options.language, which submit requires
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
        words: bool = False,
    ) -> Future:
        """Queues one segment; `previous`, `speculative` and `words` are accepted and ignored (no
        drafts, and no timestamps for word timings, here)."""
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
        pending = _Pending(
            Future(), np.asarray(audio, dtype=np.float32), options, window, final, stream, prompt, 0, options.language
        )
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

    def health(self) -> dict[str, Any]:
        """The worker's state for /healthz: it never restarts, so alive while its thread runs."""
        with self._lock:
            queued, running = len(self._incoming), len(self._running)
        return {
            "alive": self._worker.is_alive(),
            "restarts": 0,
            "last_error": None,
            "queued": queued,
            "running": running,
        }

    def load_stats(self) -> dict[str, float]:
        """None of the torch engine's running totals: TensorRT-LLM's Executor keeps its own."""
        return {}

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
            stale = [(rid, p) for rid, p in self._running.items() if superseded(p, latest)]
            for rid, _ in stale:
                del self._running[rid]
        for rid, pending in stale:
            try:
                self.executor.cancel_request(rid)
            except Exception:  # noqa: BLE001 -- it may have finished meanwhile
                log.debug("cancel of request %s failed", rid, exc_info=True)
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
        language = pending.language
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
