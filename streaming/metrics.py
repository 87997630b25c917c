"""Prometheus metrics of one server, with the names docs/architecture.md fixes for dashboards and checks.

Every server owns its registry (not prometheus-client's global one), so several servers in one
process, as in the tests, never share or clash over counters. The workers of `serve --workers N`
(streaming.server.workers) run prometheus-client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set
before they start, each keeps its values in files there, and `render` sums every worker's, so a
scrape that reaches any worker sees the whole server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engines.backend import Backend
from engines.transcript import Transcript

from .server.admission import LoadMeter

# Counters and histograms would also export a `<name>_created` Unix timestamp per series, which reads
# like a count (`breeze_sessions_created`) and doubles the lines; no dashboard needs it.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated
CONTENT_TYPE = CONTENT_TYPE_LATEST
ERROR_CODES = ("bad_request", "unsupported_encoding", "frame_too_large", "unauthorized", "overloaded", "internal")
DRAFT_SOURCES = ("hypothesis", "lookup", "medusa")
REJECT_REASONS = ("unauthorized", "origin", "overloaded", "capacity", "per_client", "draining", "loading")
# final latency includes the silence hangover (about 0.5 s by default), so buckets start there
LATENCY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0)
# the engine's share of a final's latency: what is left of the latency budget once the hangover is spent
ENGINE_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """The counters sessions and transcribers update; `render` is the `/metrics` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine_load: EngineLoadCollector | None = None
        r = self.registry
        self.sessions_active = Gauge(
            "breeze_sessions_active", "Sessions connected now.", registry=r, multiprocess_mode="livesum"
        )
        self.sessions = Counter("breeze_sessions", "Sessions started (a valid start message).", registry=r)
        self.audio_seconds = Counter("breeze_audio_seconds", "Seconds of audio received from clients.", registry=r)
        self.segments = Counter("breeze_segments", "Speech segments the VAD opened.", registry=r)
        self.partials = Counter("breeze_partials", "Partial hypotheses sent.", registry=r)
        self.finals = Counter("breeze_finals", "Final hypotheses sent.", registry=r)
        self.decoder_forwards = Counter(
            "breeze_decoder_forwards",
            "Decoder forward passes (a speculative verification pass counts once).",
            registry=r,
        )
        self.tokens = Counter("breeze_tokens", "Tokens emitted into hypotheses (partials and finals).", registry=r)
        self.draft_proposed = Counter(
            "breeze_draft_tokens_proposed", "Draft tokens proposed to the decoder, by source.", ["source"], registry=r
        )
        self.draft_accepted = Counter(
            "breeze_draft_tokens_accepted", "Draft tokens the decoder accepted, by source.", ["source"], registry=r
        )
        self.encoder_seconds = Counter("breeze_encoder_seconds", "Engine time spent in the encoder.", registry=r)
        self.decoder_seconds = Counter("breeze_decoder_seconds", "Engine time spent decoding.", registry=r)
        self.final_latency = Histogram(
            "breeze_final_latency_seconds",
            "From the audio at a segment's end reaching the server to its final being sent.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.final_engine = Histogram(
            "breeze_final_engine_seconds",
            "From a final's request to the engine to its transcript: engine queue, encoder and decoder.",
            buckets=ENGINE_BUCKETS,
            registry=r,
        )
        self.early_finals = Counter(
            "breeze_early_finals",
            "Finals started during the silence hangover, by outcome: used, or void (speech resumed).",
            ["outcome"],
            registry=r,
        )
        self.errors = Counter("breeze_errors", "Error events sent to clients, by code.", ["code"], registry=r)
        self.rejected = Counter(  # streaming.server.gate: refusals before a session starts
            "breeze_connections_rejected", "WebSocket upgrades refused, by reason.", ["reason"], registry=r
        )
        self.engine_restarts = Gauge(
            "breeze_engine_restarts",
            "Times the engine worker was restarted after a crash.",
            registry=r,
            multiprocess_mode="max",
        )
        self.draining = Gauge(
            "breeze_draining",
            "1 while the server drains (SIGTERM/SIGINT), else 0.",
            registry=r,
            multiprocess_mode="max",
        )
        self.load = LoadMeter()
        self._add_capacity_gauges()
        for source in DRAFT_SOURCES:  # export zeros, so rates work before the first draft
            self.draft_proposed.labels(source)
            self.draft_accepted.labels(source)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def _add_capacity_gauges(self) -> None:
        """Admission by measured capacity (streaming.server.admission); with `serve --workers N` each
        worker reports its share of the capacity, its own sessions' backlog, and whether it admits."""
        self.capacity = Gauge(
            "breeze_capacity_streams",
            "Real-time sessions the server estimates it can serve "
            "(streaming.server.admission; +Inf before sessions send speech).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.capacity_free = Gauge(
            "breeze_capacity_free_streams",
            "More sessions it would admit now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.admitting = Gauge(
            "breeze_admitting",
            "1 while new sessions are admitted, 0 while refused for capacity.",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.final_backlog = Gauge(
            "breeze_final_backlog_seconds",
            "Audio of closed segments waiting for their finals, all sessions.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.final_rtf = Gauge(
            "breeze_final_rtf",
            "Engine seconds per second of audio of recent finals.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.final_queue_delay = Gauge(
            "breeze_final_queue_delay_seconds",
            "How long recent finals waited for the engine, while audio waits for finals.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def watch_engine(self, engine: Callable[[], Backend | None]) -> None:
        """Export the load figures of `engine()` (its `load_stats()`) at every scrape."""
        self.engine_load = EngineLoadCollector(engine)
        self.registry.register(self.engine_load)

    def count_decode(self, transcript: Transcript) -> None:
        """Engine work of one decode, partial or final, whether or not its text was sent."""
        self.decoder_forwards.inc(transcript.forwards)
        self.tokens.inc(len(transcript.tokens))
        self.encoder_seconds.inc(transcript.encoder_seconds)
        self.decoder_seconds.inc(transcript.decoder_seconds)
        for source, n in transcript.draft_proposed.items():
            self.draft_proposed.labels(source).inc(n)
        for source, n in transcript.draft_accepted.items():
            self.draft_accepted.labels(source).inc(n)

    def publish(self, capacity: dict[str, Any]) -> None:
        """The admission estimate (streaming.server.admission.Admission.report) into its gauges."""
        inf = float("inf")
        self.capacity.set(inf if capacity["capacity"] is None else capacity["capacity"])
        self.capacity_free.set(inf if capacity["free"] is None else capacity["free"])
        self.admitting.set(int(capacity["admitting"]))
        self.final_backlog.set(capacity["backlog_s"])
        self.final_rtf.set(capacity["rtf"] or 0.0)
        self.final_queue_delay.set(capacity["queue_delay_s"])

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # a worker of several: every worker's values, summed
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
            if self.engine_load is not None:  # the engine's figures, the same in every worker: once
                registry.register(self.engine_load)
            return generate_latest(registry)
        return generate_latest(self.registry)


ENGINE_COUNTERS = (  # load_stats() key, metric name (prometheus-client appends _total), help
    ("steps", "breeze_engine_steps", "Decoder steps of the running batch."),
    ("step_rows", "breeze_engine_step_rows", "Rows (segments) advanced by decoder steps, summed: / steps = occupancy."),
    ("step_seconds", "breeze_engine_step_seconds", "Seconds spent in decoder steps: / steps = mean step time."),
    ("encoder_calls", "breeze_engine_encoder_calls", "Encoder calls (one per batch of windows of one length)."),
    ("encoder_windows", "breeze_engine_encoder_windows", "Segments encoded, summed over encoder calls."),
)
ENGINE_GAUGES = (
    ("queued", "breeze_engine_queue_depth", "Requests waiting in the engine queue now."),
    ("running", "breeze_engine_batch_rows", "Rows (segments) in the running decoder batch now."),
)


class EngineLoadCollector:
    """The engine's own running totals, read when /metrics is scraped: nothing is counted twice and
    the engine's step loop pays only for integer additions. Engines that keep none of these
    figures (the TensorRT-LLM executor) export none of these names."""

    def __init__(self, engine: Callable[[], Backend | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        if engine is None:
            return
        figures = engine.load_stats()
        for key, name, documentation in ENGINE_COUNTERS:
            if key in figures:
                yield CounterMetricFamily(name, documentation, value=figures[key])
        for key, name, documentation in ENGINE_GAUGES:
            if key in figures:
                yield GaugeMetricFamily(name, documentation, value=figures[key])
