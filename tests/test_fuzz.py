"""Property-based fuzzing (hypothesis) of the native protocol and the audio decoders.

- In-process: generated message sequences (start messages with valid and invalid fields of
  every type, raw non-JSON and binary first frames, audio frames of any bytes and sizes, stop,
  stray text) drive `NativeSession` through a fake connection with the real tiny engine; the
  session must end without raising, every sequence with an invalid message must end in an
  `error` event with the documented code and close code, valid ones in `end` and 1000, and no
  `internal` error ever.
- Over real sockets: the same generator against a real server (in a thread of its own), with a
  stop appended, through a synchronous client; afterwards the server must still answer, with
  no `internal` errors and no failed connection handler in its log.
- Decoders: `AudioDecoder` on every encoding and many rates, with frames cut anywhere: finite
  float32 in [-1, 1], frame cuts do not change the output, lengths match the rates; G.711 tables.

Sizes: `BREEZE_FUZZ_SCALE` (default 1) multiplies every example count; CI runs the default
(about 7,000 messages). The figure in BENCHMARKS.md is from `BREEZE_FUZZ_SCALE=4`. With
`BREEZE_FUZZ_REPORT=path.json` the counts are written there at the end of the module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hardening_helpers import FakeConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from bench.clips import pcm16, voiced
from streaming.audio.codecs import ALAW_TO_PCM16, ENCODINGS, MULAW_TO_PCM16, AudioDecoder, encode_alaw, encode_mulaw
from streaming.audio.transcriber import TranscriberConfig
from streaming.metrics import Metrics
from streaming.protocols.base import SessionConfig, SessionContext
from streaming.protocols.native import LANGUAGES, NativeSession
from streaming.server.app import Server, ServerConfig
from streaming.server.gate import Limits

SCALE = float(os.environ.get("BREEZE_FUZZ_SCALE", "1"))
LIMIT = 8192  # the fuzzed servers' frame limit: oversized frames stay cheap to generate
TRANSCRIBER = TranscriberConfig(partial_interval=0.1)
CONFIG = SessionConfig(max_frame_bytes=LIMIT, idle_timeout=10.0, transcriber=TRANSCRIBER)
COUNTS: Counter = Counter()
CLOSE_CODES = {"bad_request": {1003, 1007, 1008}, "unsupported_encoding": {1003}, "frame_too_large": {1009}}
EVENT_TYPES = {"ready", "partial", "final", "error", "end"}
SPEECH = pcm16(voiced(2.0))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


# --- generators --------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
VALID_FIELDS = {
    "encoding": st.sampled_from(ENCODINGS),
    "sample_rate": st.sampled_from([8000, 16000, 22050, 24000, 44100, 48000, 16000.0]),
    "channels": st.sampled_from([1, 1.0]),
    "language": st.sampled_from(LANGUAGES),
    "partials": st.booleans(),
    "token": st.text(max_size=8),
    "extra": json_values,
}
INVALID_FIELDS = {
    "encoding": st.one_of(st.sampled_from(["opus", "PCM_S16LE", "", "mp3"]), json_values),
    "sample_rate": st.one_of(st.integers(-1, 200000), st.floats(allow_nan=True), json_values),
    "channels": st.one_of(st.sampled_from([0, 2, True, "1"]), json_values),
    "language": st.one_of(st.sampled_from(["fr", "ZH", "", "zh-TW"]), json_values),
    "partials": json_values,
}


@st.composite
def start_message(draw) -> str | bytes:
    """Mostly valid start messages (so that audio follows), else one bad field, or no start at all."""
    kind = draw(st.sampled_from(["valid"] * 10 + ["bad field"] * 3 + ["type", "raw", "json", "binary"]))
    if kind == "raw":
        return draw(st.one_of(st.text(max_size=40), st.just('{"type": "start", '), st.just("")))
    if kind == "json":
        return json.dumps(draw(json_values))
    if kind == "binary":
        return draw(st.binary(max_size=64))
    fields = {name: draw(value) for name, value in VALID_FIELDS.items() if draw(st.booleans())}
    if kind == "bad field":
        name = draw(st.sampled_from(sorted(INVALID_FIELDS)))
        fields[name] = draw(INVALID_FIELDS[name])
    kind_value = (
        "start" if kind != "type" else draw(st.one_of(st.sampled_from(["stop", "Start", "", "ready"]), json_scalars))
    )
    return json.dumps({"type": kind_value, **fields}, allow_nan=True)


@st.composite
def frame(draw) -> str | bytes:
    kind = draw(st.sampled_from(["noise"] * 16 + ["speech"] * 16 + ["big", "stop", "text", "json"]))
    if kind == "noise":
        return draw(st.binary(max_size=800))
    if kind == "speech":
        start = draw(st.integers(0, len(SPEECH) - 2))
        return SPEECH[start : start + draw(st.integers(1, 6400))]
    if kind == "big":
        return draw(st.binary(min_size=LIMIT - 2, max_size=LIMIT + 64))
    if kind == "stop":
        return json.dumps(
            {"type": "stop", **draw(st.dictionaries(st.sampled_from(["reason", "x"]), json_scalars, max_size=1))}
        )
    if kind == "text":
        return draw(st.text(max_size=40))
    return json.dumps(draw(json_values))


frames = st.integers(0, 40).flatmap(lambda n: st.lists(frame(), min_size=n, max_size=n))  # lengths spread evenly
sequences = st.tuples(start_message(), frames).map(lambda t: [t[0], *t[1]])


# --- the oracle: what docs/architecture.md and streaming.protocols.native promise for a sequence ------------------------


def _start_problems(message: str | bytes) -> tuple[set[str], int] | None:
    """None for a valid start; else (the allowed error codes, the close code) of its first problem class."""
    if isinstance(message, bytes):
        return {"bad_request"}, 1003
    try:
        start = json.loads(message)
    except ValueError:
        return {"bad_request"}, 1007
    if not isinstance(start, dict) or start.get("type") != "start":
        return {"bad_request"}, 1008
    encoding = start.get("encoding", "pcm_s16le")
    rate = start.get("sample_rate", 16000)
    channels = start.get("channels", 1)
    field_errors = (
        not isinstance(encoding, str)
        or start.get("language", "zh") not in LANGUAGES
        or not isinstance(start.get("partials", True), bool)
    )
    format_errors = (
        not isinstance(rate, (int, float))
        or isinstance(rate, bool)
        or not float(rate).is_integer()
        or not 8000 <= rate <= 48000
        or isinstance(channels, bool)
        or channels != 1
    )
    unknown_encoding = isinstance(encoding, str) and encoding not in ENCODINGS
    if field_errors:
        return {"bad_request"}, 1008
    if unknown_encoding:
        return {"unsupported_encoding"}, 1003
    if format_errors:
        return {"bad_request"}, 1008
    return None


def _is_stop(message: str) -> bool:
    try:
        value = json.loads(message)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == "stop"


SAMPLE_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}


def oracle(messages: list[str | bytes]) -> tuple[str, set[str] | None, int | None, int]:
    """(outcome, allowed error codes, close code, messages the server reads); outcome error | end | left."""
    for i, message in enumerate(messages):
        if len(message) > LIMIT:
            return "error", {"frame_too_large"}, 1009, i + 1
        if i == 0:
            problem = _start_problems(message)
            if problem is not None:
                return "error", problem[0], problem[1], 1
        elif isinstance(message, str):
            if _is_stop(message):
                return "end", None, 1000, i + 1
            return "error", {"bad_request"}, 1003, i + 1
    return "left", None, None, len(messages)


def check(messages: list, events: list[dict], close_code: int | None, closed_by_client: bool) -> None:
    outcome, codes, expected_close, read = oracle(messages)
    assert all(e.get("type") in EVENT_TYPES for e in events), events
    assert not any(e["type"] == "error" and e["code"] == "internal" for e in events), events
    errors = [e for e in events if e["type"] == "error"]
    COUNTS["messages"] += read
    if outcome == "error":
        COUNTS["invalid"] += 1
        assert errors and events[-1] is errors[-1] and len(errors) == 1, (messages[:read], events)
        assert errors[0]["code"] in codes and len(errors[0]["message"]) > 20, (messages[:read], errors)
        assert close_code == expected_close and close_code in CLOSE_CODES[errors[0]["code"]], (close_code, errors)
        COUNTS["answered"] += 1
    elif outcome == "end":
        # bytes that end partway into a sample are dropped, and `end` says so in a warning
        width = SAMPLE_BYTES[json.loads(messages[0]).get("encoding", "pcm_s16le")]
        leftover = sum(len(m) for m in messages[1:read] if isinstance(m, bytes)) % width
        end = dict(events[-1])
        warning = end.pop("warning", None)
        assert not errors and events[0]["type"] == "ready" and end == {"type": "end"}, events
        assert (warning is not None) == (leftover != 0), (leftover, events[-1])
        assert close_code == 1000
    else:
        assert not errors, events
    finals = [e["segment"] for e in events if e["type"] == "final"]
    assert finals == sorted(set(finals)), "one final per segment, in order"
    COUNTS["finals"] += len(finals)
    COUNTS["partials"] += sum(e["type"] == "partial" for e in events)
    COUNTS["ended"] += outcome == "end"


# --- in-process --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    line = (
        f"fuzz: {COUNTS['messages']} messages ({COUNTS['messages_socket']} over sockets) in {COUNTS['sessions']} "
        f"sessions; {COUNTS['invalid']} invalid, {COUNTS['answered']} answered with an error event; "
        f"{COUNTS['ended']} ended with stop; {COUNTS['partials']} partials and {COUNTS['finals']} finals sent; "
        f"{COUNTS['decoder_frames']} decoder frames"
    )
    print("\n" + line)
    if os.environ.get("BREEZE_FUZZ_REPORT"):
        Path(os.environ["BREEZE_FUZZ_REPORT"]).write_text(json.dumps(dict(COUNTS), indent=2) + "\n")


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(messages=sequences)
def test_native_session_in_process(tiny_engine, loop, messages):
    connection = FakeConnection(messages)
    session = NativeSession(connection, SessionContext(tiny_engine, Metrics(), CONFIG))
    loop.run_until_complete(asyncio.wait_for(session.run(), 30))  # raises if the session raised
    COUNTS["sessions"] += 1
    check(messages, connection.events(), connection.close_code, closed_by_client=True)
    assert session._transcriber is None or session._transcriber._tasks == set(), "decodes left running"


# --- over real sockets -------------------------------------------------------------------------------


class ThreadServer:
    """A Server on its own event loop in a thread, for synchronous clients."""

    def __init__(self, engine) -> None:
        self.loop = asyncio.new_event_loop()
        config = ServerConfig(port=0, session=CONFIG, limits=Limits(max_per_client=0, max_sessions=0))
        self.server = Server(config, engine=engine)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class HandlerFailures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def socket_server(tiny_engine):
    failures = HandlerFailures()
    for name in ("websockets", "streaming"):
        logging.getLogger(name).addHandler(failures)
    with ThreadServer(tiny_engine) as ts:
        yield ts
        metrics = ts.server.metrics.registry
        assert metrics.get_sample_value("breeze_errors_total", {"code": "internal"}) == 0
        assert ts.thread.is_alive()
        with sync_connect(f"ws://127.0.0.1:{ts.server.port}/v1/stream") as ws:  # still serving
            ws.send(json.dumps({"type": "start"}))
            assert json.loads(ws.recv(5))["type"] == "ready"
    for name in ("websockets", "streaming"):
        logging.getLogger(name).removeHandler(failures)
    crashes = [r for r in failures.records if "handler failed" in r.getMessage() or "internal error" in r.getMessage()]
    assert not crashes, [r.getMessage() for r in crashes]


@settings(max_examples=examples(600), deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=sequences)
def test_native_protocol_over_sockets(socket_server, messages):
    messages = [*messages, json.dumps({"type": "stop"})]  # every run ends: end, or an error before it
    events: list[dict] = []
    started = time.monotonic()
    with sync_connect(f"ws://127.0.0.1:{socket_server.server.port}/v1/stream", max_size=None) as ws:
        try:
            for message in messages:
                ws.send(message)
        except ConnectionClosed:
            pass  # the server ended the session (an error); what it said is read below
        try:
            while True:
                events.append(json.loads(ws.recv(20)))
        except ConnectionClosed:
            pass
    assert time.monotonic() - started < 5, "the session and its close took too long (a close held up?)"
    before = COUNTS["messages"]
    check(messages, events, ws.close_code, closed_by_client=False)
    COUNTS["messages_socket"] += COUNTS["messages"] - before
    COUNTS["sessions"] += 1


# --- audio decoders ----------------------------------------------------------------------------------


@settings(max_examples=examples(300), deadline=None)
@given(
    encoding=st.sampled_from(ENCODINGS),
    rate=st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000]),
    data=st.binary(max_size=6000),
    cuts=st.lists(st.integers(0, 6000), max_size=8),
)
def test_decoder_frames_cut_anywhere(encoding, rate, data, cuts):
    pieces = [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])]
    whole = AudioDecoder(encoding, rate)
    one = np.concatenate([whole.decode(data), whole.flush()])
    split = AudioDecoder(encoding, rate)
    parts = [split.decode(piece) for piece in pieces] + [split.flush()]
    COUNTS["decoder_frames"] += len(pieces)
    for out in [one, *parts]:
        assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
    together = np.concatenate(parts)
    width = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}[encoding]
    samples = len(data) // width
    if rate == 16000:
        assert len(one) == samples and np.array_equal(one, together), "frame cuts must not change the audio"
        assert np.abs(one).max(initial=0) <= 1.0
    else:
        assert abs(len(one) - samples * 16000 / rate) <= 2 and len(together) == len(one)
        assert np.allclose(one, together, atol=1e-5), "frame cuts must not change the audio"
        assert np.abs(one).max(initial=0) <= 1.5  # band-limiting can overshoot full scale a little


@settings(max_examples=examples(100), deadline=None)
@given(data=st.binary(min_size=1, max_size=512))
def test_g711_tables_round_trip(data):
    codes = np.frombuffer(data, np.uint8)
    for table, encode in ((MULAW_TO_PCM16, encode_mulaw), (ALAW_TO_PCM16, encode_alaw)):
        values = table[codes]
        again = table[np.frombuffer(encode(values), np.uint8)]
        assert np.array_equal(values, again), "decode(encode(decode(x))) == decode(x)"
    COUNTS["decoder_frames"] += 1


@settings(max_examples=examples(100), deadline=None)
@given(
    rate=st.one_of(st.integers(-10, 100000), st.floats(allow_nan=True), st.booleans(), st.text(max_size=5), st.none()),
    channels=st.one_of(st.integers(-2, 4), st.booleans(), st.none()),
    encoding=st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=8)),
)
def test_decoder_formats(rate, channels, encoding):
    from streaming.audio.codecs import AudioFormatError

    valid = (
        encoding in ENCODINGS
        and isinstance(rate, (int, float))
        and not isinstance(rate, bool)
        and float(rate).is_integer()
        and 8000 <= rate <= 48000
        and channels == 1
        and not isinstance(channels, bool)
    )
    try:
        AudioDecoder(encoding, rate, channels)
    except AudioFormatError as exc:
        assert not valid and exc.code in ("bad_request", "unsupported_encoding") and len(str(exc)) > 20
    else:
        assert valid
    COUNTS["decoder_frames"] += 1
