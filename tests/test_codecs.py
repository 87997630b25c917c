"""Wire decoding (G.711, PCM, streaming resampling) and file loading."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile
import soxr

from engines.whisper.audio import AudioFileError, load_audio
from streaming.audio.codecs import (
    ALAW_TO_PCM16,
    ENCODINGS,
    MULAW_TO_PCM16,
    AudioDecoder,
    AudioFormatError,
    encode_alaw,
    encode_mulaw,
)


def _sine(rate: int, seconds: float = 2.0, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _random_splits(data: bytes, count: int, seed: int) -> list[bytes]:
    """`data` cut at random byte offsets (samples split mid-way included), some pieces empty."""
    cuts = np.sort(np.random.default_rng(seed).integers(0, len(data) + 1, count))
    bounds = [0, *cuts.tolist(), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _decode_all(decoder: AudioDecoder, frames: list[bytes]) -> np.ndarray:
    return np.concatenate([decoder.decode(f) for f in frames] + [decoder.flush()])


# --- G.711 ------------------------------------------------------------------------------------


def test_mulaw_known_values():
    # G.711 mu-law: bytes are stored inverted; 0xFF and 0x7F are +-0, 0x00/0x80 the extremes (+-8031 in
    # 14-bit units, x4 in 16-bit).
    assert MULAW_TO_PCM16[0xFF] == 0
    assert MULAW_TO_PCM16[0x7F] == 0
    assert MULAW_TO_PCM16[0x00] == -32124
    assert MULAW_TO_PCM16[0x80] == 32124
    assert MULAW_TO_PCM16[0xFE] == 8  # segment 0, step 1: ((1 << 3) + 132) - 132
    assert MULAW_TO_PCM16[0xF0] == 120  # segment 0, step 15: ((15 << 3) + 132) - 132


def test_alaw_known_values():
    # G.711 A-law: even bits inverted (XOR 0x55); 0xD5/0x55 are the smallest magnitudes (+-1 in
    # 12-bit half-steps, i.e. +-8 in 16-bit), 0xAA/0x2A the extremes (+-4032 x 8).
    assert ALAW_TO_PCM16[0xD5] == 8
    assert ALAW_TO_PCM16[0x55] == -8
    assert ALAW_TO_PCM16[0xAA] == 32256
    assert ALAW_TO_PCM16[0x2A] == -32256


def test_tables_are_monotonic_within_each_sign():
    # Codes 0x80..0xFF (mu-law, inverted) and the A-law codes ordered by magnitude must decode monotonically.
    assert np.all(np.diff(MULAW_TO_PCM16[0x80:].astype(int)) < 0)
    assert np.all(np.diff(MULAW_TO_PCM16[:0x80].astype(int)) > 0)
    magnitudes = ALAW_TO_PCM16[np.arange(0x80, 0x100) ^ 0x55].astype(int)
    assert np.all(np.diff(magnitudes) > 0)


def test_encode_decode_round_trip_on_every_code():
    codes = np.arange(256, dtype=np.uint8)
    mu = np.frombuffer(encode_mulaw(MULAW_TO_PCM16[codes]), np.uint8)
    expected = codes.copy()
    expected[0x7F] = 0xFF  # -0 encodes as +0
    assert np.array_equal(mu, expected)
    a = np.frombuffer(encode_alaw(ALAW_TO_PCM16[codes]), np.uint8)
    assert np.array_equal(a, codes)


def test_encoders_quantise_to_within_half_a_step():
    x = np.arange(-32768, 32768, dtype=np.int16)
    in_range = np.abs(x.astype(int)) < 32000  # beyond, mu-law clips at +-32124
    for encode, table in ((encode_mulaw, MULAW_TO_PCM16), (encode_alaw, ALAW_TO_PCM16)):
        error = np.abs(table[np.frombuffer(encode(x), np.uint8)].astype(int) - x.astype(int))
        # Half the largest step (1024) plus the 2-3 low bits the reference encoders drop.
        assert error[in_range].max() <= 512 + 4
        assert error[np.abs(x.astype(int)) < 256].max() <= 12  # fine steps near zero


def test_encoders_match_audioop_bit_for_bit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop", reason="audioop was removed in Python 3.13")
    every = bytes(range(256))
    assert np.array_equal(np.frombuffer(audioop.ulaw2lin(every, 2), "<i2"), MULAW_TO_PCM16)
    assert np.array_equal(np.frombuffer(audioop.alaw2lin(every, 2), "<i2"), ALAW_TO_PCM16)
    x = np.arange(-32768, 32768, dtype=np.int16)
    assert encode_mulaw(x) == audioop.lin2ulaw(x.tobytes(), 2)
    assert encode_alaw(x) == audioop.lin2alaw(x.tobytes(), 2)


def test_encoders_take_float_full_scale():
    assert encode_mulaw(np.array([0.0, 1.0, -1.0], np.float32)) == bytes([0xFF, 0x80, 0x00])
    assert encode_alaw(np.array([0.0, 2.0, -1.0], np.float32)) == bytes([0xD5, 0xAA, 0x2A])


# --- AudioDecoder -----------------------------------------------------------------------------


def test_pcm_s16le_at_16k_is_exact_and_split_safe():
    pcm = (np.random.default_rng(0).integers(-32768, 32768, 16000)).astype("<i2")
    expected = pcm.astype(np.float32) / 32768
    frames = _random_splits(pcm.tobytes(), 300, seed=1)
    assert any(len(f) % 2 for f in frames)
    assert np.array_equal(_decode_all(AudioDecoder(), frames), expected)


def test_pcm_f32le_split_inside_samples():
    x = _sine(16000)
    frames = _random_splits(x.astype("<f4").tobytes(), 200, seed=2)
    assert any(len(f) % 4 for f in frames)
    assert np.array_equal(_decode_all(AudioDecoder("pcm_f32le"), frames), x)


def test_pcm_f32le_non_finite_values_become_silence_or_full_scale():
    x = np.array([np.nan, np.inf, -np.inf, 0.25], "<f4")
    assert AudioDecoder("pcm_f32le").decode(x.tobytes()).tolist() == [0.0, 1.0, -1.0, 0.25]


@pytest.mark.parametrize(
    "encoding, encode, table", [("mulaw", encode_mulaw, MULAW_TO_PCM16), ("alaw", encode_alaw, ALAW_TO_PCM16)]
)
def test_g711_stream_decoding(encoding, encode, table):
    data = encode(_sine(16000))
    out = _decode_all(AudioDecoder(encoding), _random_splits(data, 50, seed=3))
    assert np.array_equal(out, table[np.frombuffer(data, np.uint8)].astype(np.float32) / 32768)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 44100, 48000])
def test_streaming_resampler_equals_one_shot(rate):
    pcm = (_sine(rate) * 32767).astype("<i2")
    frames = _random_splits(pcm.tobytes(), 400, seed=rate)
    out = _decode_all(AudioDecoder("pcm_s16le", rate), frames)
    one_shot = soxr.resample(pcm.astype(np.float32) / 32768, rate, 16000, quality="HQ")
    assert out.shape == one_shot.shape == (32000,)
    np.testing.assert_allclose(out, one_shot, atol=1e-6)
    # No click anywhere: away from the stream's two edges it is the ideal 16 kHz sine.
    ideal = _sine(16000) * 32767 / 32768
    assert np.abs(out - ideal)[400:-400].max() < 2e-4


def test_8k_mulaw_telephony_stream():
    data = encode_mulaw(_sine(8000, hz=300))
    out = _decode_all(AudioDecoder("mulaw", 8000), _random_splits(data, 100, seed=4))
    assert out.shape == (32000,)
    assert np.abs(out - _sine(16000, hz=300))[400:-400].max() < 0.02  # G.711 quantisation noise


def test_flush_resets_for_a_new_stream():
    decoder = AudioDecoder("pcm_s16le", 8000)
    data = (_sine(8000) * 32767).astype("<i2").tobytes()
    first = _decode_all(decoder, [data])
    assert np.array_equal(_decode_all(decoder, [data]), first)
    # A dangling half sample is dropped at flush, not carried into the next stream.
    decoder.decode(data[:3])
    decoder.flush()
    assert np.array_equal(_decode_all(decoder, [data]), first)


def test_bad_formats_are_rejected_with_protocol_codes():
    with pytest.raises(AudioFormatError, match="pcm_s16le") as info:
        AudioDecoder("opus")
    assert info.value.code == "unsupported_encoding"
    assert isinstance(info.value, ValueError)
    for rate in (7999, 48001, 0, 16000.5, float("nan"), float("inf"), "16000", True, None):
        with pytest.raises(AudioFormatError, match="sample_rate") as info:
            AudioDecoder("pcm_s16le", rate)  # type: ignore[arg-type]
        assert info.value.code == "bad_request"
    with pytest.raises(AudioFormatError, match="mono") as info:
        AudioDecoder("pcm_s16le", 16000, channels=2)
    assert info.value.code == "bad_request"
    assert AudioDecoder("alaw", 16000.0).sample_rate == 16000  # JSON numbers may arrive as floats


def test_every_encoding_is_accepted_at_every_rate_bound():
    for encoding in ENCODINGS:
        for rate in (8000, 48000):
            AudioDecoder(encoding, rate)


# --- load_audio -------------------------------------------------------------------------------


def test_load_stereo_wav_downmixes_and_resamples(tmp_path):
    left = _sine(44100, seconds=1.0)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, 0.5 * left], axis=1), 44100, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size == 16000
    np.testing.assert_allclose(audio[400:-400], 0.75 * _sine(16000, 1.0)[400:-400], atol=2e-3)


def test_load_flac_at_native_rate(tmp_path):
    path = tmp_path / "tone.flac"
    soundfile.write(path, _sine(16000, 0.5), 16000)
    assert load_audio(path).size == 8000
    assert load_audio(path, sample_rate=8000).size == 4000


def test_unreadable_files_raise_audio_file_error(tmp_path, monkeypatch):
    with pytest.raises(AudioFileError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    empty_wav = tmp_path / "empty.wav"
    soundfile.write(empty_wav, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioFileError, match="no audio"):
        load_audio(empty_wav)
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    with pytest.raises(AudioFileError):
        load_audio(text)
    zero_bytes = tmp_path / "zero.ogg"
    zero_bytes.write_bytes(b"")
    with pytest.raises(AudioFileError):
        load_audio(zero_bytes)
    monkeypatch.setattr("engines.whisper.audio.shutil.which", lambda name: None)
    with pytest.raises(AudioFileError, match="install ffmpeg"):
        load_audio(text)
