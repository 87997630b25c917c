"""Audio input decoding: wire encodings of the native protocol, to 16 kHz float32 (files: engines/whisper/audio.py).

Everything downstream (VAD, Whisper) works on mono float32 at 16 kHz in [-1, 1]; this module is
the one place that knows about byte layouts, G.711 companding and resampling.
"""

from __future__ import annotations

import atexit
import weakref

import numpy as np
import soxr

SAMPLE_RATE = 16000
"""The rate every decoded array has: Whisper's."""

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000

_SAMPLE_WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
ENCODINGS = tuple(_SAMPLE_WIDTH)
"""Wire encodings the native protocol accepts (little-endian PCM, G.711 mu-law and A-law)."""


class AudioFormatError(ValueError):
    """A stream's declared format can't be decoded; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- G.711 (ITU-T G.711, the classic Sun/CCITT reference algorithms) -------------------------
# Decoding is a 256-entry table lookup; the tables hold the 16-bit linear values the reference
# decoders produce (mu-law: +-32124 full scale, A-law: +-32256), so results match audioop's.


def _mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


MULAW_TO_PCM16 = _mulaw_table()
"""Linear 16-bit value of each mu-law byte."""
ALAW_TO_PCM16 = _alaw_table()
"""Linear 16-bit value of each A-law byte."""

_MULAW_SEGMENT_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _as_pcm16(samples: np.ndarray) -> np.ndarray:
    """int16-range values as int32; floats are taken as [-1, 1] full scale (clients hold either)."""
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.floating):
        x = np.round(np.clip(x, -1.0, 1.0) * 32768.0)
    pcm: np.ndarray = np.clip(x, -32768, 32767).astype(np.int32).ravel()
    return pcm


def encode_mulaw(samples: np.ndarray) -> bytes:
    """mu-law bytes of int16 (or float in [-1, 1]) samples, as the G.711 reference encoder."""
    pcm = _as_pcm16(samples) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + (0x84 >> 2)
    segment = np.searchsorted(_MULAW_SEGMENT_END, magnitude)
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8).tobytes()


def encode_alaw(samples: np.ndarray) -> bytes:
    """A-law bytes of int16 (or float in [-1, 1]) samples, as the G.711 reference encoder."""
    pcm = _as_pcm16(samples) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    segment = np.searchsorted(_ALAW_SEGMENT_END, magnitude)  # 13-bit magnitudes: never past 7
    code = (segment << 4) | ((magnitude >> np.maximum(segment, 1)) & 0x0F)
    return (code ^ mask).astype(np.uint8).tobytes()


_MULAW_TO_FLOAT = MULAW_TO_PCM16.astype(np.float32) / 32768.0
_ALAW_TO_FLOAT = ALAW_TO_PCM16.astype(np.float32) / 32768.0


def _decode_samples(encoding: str, data: bytes) -> np.ndarray:
    """Float32 samples of whole-sample bytes (no resampling)."""
    if encoding == "pcm_s16le":
        return np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768.0)
    if encoding == "pcm_f32le":
        # NaN/inf would poison the resampler state and the model for the rest of the stream, and
        # values past full scale (1e30 is four valid bytes) the log-mel: clip to [-1, 1].
        samples = np.frombuffer(data, "<f4").astype(np.float32)
        return np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    table = _MULAW_TO_FLOAT if encoding == "mulaw" else _ALAW_TO_FLOAT
    return table[np.frombuffer(data, np.uint8)]


class AudioDecoder:
    """Turns a stream of binary frames in one wire format into 16 kHz float32 audio.

    Frames may split samples anywhere: a trailing partial sample is kept for the next frame
    (`pending_bytes`), so audio cut at odd byte offsets decodes as if it were sent whole.
    Resampling uses soxr's streaming resampler, so frame boundaries leave no clicks; the
    resampler holds back a few ms of output that `flush` releases at the end of the stream.
    """

    def __init__(self, encoding: str = "pcm_s16le", sample_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if encoding not in _SAMPLE_WIDTH:
            raise AudioFormatError(
                "unsupported_encoding",
                f"encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}",
            )
        numeric = isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
        if not numeric or not float(sample_rate).is_integer():
            raise AudioFormatError("bad_request", f"sample_rate must be an integer in Hz, got {sample_rate!r}")
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise AudioFormatError(
                "bad_request",
                f"sample_rate {sample_rate} is out of range; send audio at {MIN_SAMPLE_RATE} to "
                f"{MAX_SAMPLE_RATE} Hz (16000 avoids resampling)",
            )
        if channels != 1 or isinstance(channels, bool):
            raise AudioFormatError(
                "bad_request", f"channels must be 1, got {channels!r}; down-mix to mono before sending"
            )
        self.encoding = encoding
        self.sample_rate = int(sample_rate)
        self._width = _SAMPLE_WIDTH[encoding]
        self._partial = b""
        self._resampler = (
            soxr.ResampleStream(self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if self.sample_rate != SAMPLE_RATE
            else None
        )
        _LIVE_DECODERS.add(self)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete sample carried to the next frame (0 at a sample boundary)."""
        return len(self._partial)

    def decode(self, frame: bytes) -> np.ndarray:
        """The 16 kHz samples this frame completes (possibly none while the resampler fills)."""
        data = self._partial + bytes(frame) if self._partial else bytes(frame)
        whole = len(data) - len(data) % self._width
        self._partial = data[whole:]
        samples = _decode_samples(self.encoding, data[:whole])
        if self._resampler is None:
            return samples
        resampled: np.ndarray = self._resampler.resample_chunk(samples)
        return resampled

    def flush(self) -> np.ndarray:
        """The resampler's tail at end of stream; resets the decoder for a new stream.

        An incomplete last sample can't be decoded and is dropped: read `pending_bytes` first to
        tell the client so.
        """
        self._partial = b""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        tail: np.ndarray = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        self._resampler.clear()
        return tail

    def close(self) -> None:
        """Frees the resampler now. soxr's nanobind extension reports every resampler still alive
        when the interpreter tears its module down as a reference leak, so none may outlive exit."""
        self._resampler = None


_LIVE_DECODERS: weakref.WeakSet[AudioDecoder] = weakref.WeakSet()


@atexit.register
def _close_live_decoders() -> None:
    """Sessions still open when the process ends (a drain cut short, a task the loop abandoned)
    keep their decoders; free their resamplers before the extension module goes away."""
    for decoder in list(_LIVE_DECODERS):
        decoder.close()
