"""Prometheus metrics of one server, with the names DESIGN.md fixes for dashboards and checks.

Every server owns its registry (not prometheus-client's global one), so several servers in one
process, as in the tests, never share or clash over counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engines.engine import Transcript

# Counters and histograms would also export a `<name>_created` Unix timestamp per series, which reads
# like a count (`breeze_sessions_created`) and doubles the lines; no dashboard needs it.
disable_created_metrics()
CONTENT_TYPE = CONTENT_TYPE_LATEST
ERROR_CODES = ("bad_request", "unsupported_encoding", "frame_too_large", "unauthorized", "overloaded", "internal")
DRAFT_SOURCES = ("hypothesis", "medusa")
REJECT_REASONS = ("unauthorized", "origin", "overloaded", "per_client", "draining", "loading")
# final latency includes the silence hangover (about 0.5 s by default), so buckets start there
LATENCY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0)


class Metrics:
    """The counters sessions and transcribers update; `render` is the `/metrics` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("breeze_sessions_active", "Sessions connected now.", registry=r)
        self.sessions = Counter("breeze_sessions", "Sessions started (a valid start message).", registry=r)
        self.audio_seconds = Counter("breeze_audio_seconds", "Seconds of audio received from clients.", registry=r)
        self.segments = Counter("breeze_segments", "Speech segments the VAD opened.", registry=r)
        self.partials = Counter("breeze_partials", "Partial hypotheses sent.", registry=r)
        self.finals = Counter("breeze_finals", "Final hypotheses sent.", registry=r)
        self.decoder_forwards = Counter(
            "breeze_decoder_forwards", "Decoder forward passes (a speculative verification pass counts once).", registry=r)
        self.tokens = Counter("breeze_tokens", "Tokens emitted into hypotheses (partials and finals).", registry=r)
        self.draft_proposed = Counter(
            "breeze_draft_tokens_proposed", "Draft tokens proposed to the decoder, by source.", ["source"], registry=r)
        self.draft_accepted = Counter(
            "breeze_draft_tokens_accepted", "Draft tokens the decoder accepted, by source.", ["source"], registry=r)
        self.encoder_seconds = Counter("breeze_encoder_seconds", "Engine time spent in the encoder.", registry=r)
        self.decoder_seconds = Counter("breeze_decoder_seconds", "Engine time spent decoding.", registry=r)
        self.final_latency = Histogram(
            "breeze_final_latency_seconds", "From the audio at a segment's end reaching the server to its final being sent.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("breeze_errors", "Error events sent to clients, by code.", ["code"], registry=r)
        self.rejected = Counter(  # streaming.limits: refusals before a session starts
            "breeze_connections_rejected", "WebSocket upgrades refused, by reason.", ["reason"], registry=r)
        self.engine_restarts = Gauge("breeze_engine_restarts", "Times the engine worker was restarted after a crash.",
                                     registry=r)
        self.draining = Gauge("breeze_draining", "1 while the server drains (SIGTERM/SIGINT), else 0.", registry=r)
        for source in DRAFT_SOURCES:  # export zeros, so rates work before the first draft
            self.draft_proposed.labels(source)
            self.draft_accepted.labels(source)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
