"""Whisper's audio front end: files to 16 kHz mono float32, and that audio to normalised 80-bin
(or 128-bin) log-mel frames.

Two ways of filling the 30 s window exist and they give different tokens on the same weights
(reference notes): transformers pads the *waveform* with zeros before the STFT; faster-whisper
computes the clip's own log-mel and pads the *normalised* log-mel with 0.0. We use the
faster-whisper convention (`clip_mel` + `pad_mel`) because it lets the encoder run on a
shortened window, and keep `waveform_padded_mel` for checking against transformers.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from torch import Tensor

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    mel = f / (200.0 / 3)
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    hz = m * (200.0 / 3)
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), hz)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular filters [n_mels, N_FFT // 2 + 1], as librosa and Whisper use."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_points = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2 : n_mels + 2] - mel_points[:n_mels]))[:, None]
    return weights.astype(np.float32)


def _log_mel(audio: Tensor, n_mels: int) -> Tensor:
    """STFT power -> mel -> log10, normalised to Whisper's range (8 decades below the peak)."""
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filters(n_mels)).to(audio.device)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def clip_mel(audio: np.ndarray | Tensor, n_mels: int = 80) -> Tensor:
    """Normalised log-mel of the clip alone: [n_mels, len(audio) // 160] (faster-whisper's frames)."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    n_frames = audio.shape[-1] // HOP_LENGTH
    padded = torch.nn.functional.pad(audio, (0, HOP_LENGTH))
    return _log_mel(padded, n_mels)[..., :n_frames]


def pad_mel(mel: Tensor, n_frames: int = N_FRAMES) -> Tensor:
    """Pad (with 0.0 in the normalised domain) or cut the frames to exactly `n_frames`."""
    if mel.shape[-1] >= n_frames:
        return mel[..., :n_frames]
    return torch.nn.functional.pad(mel, (0, n_frames - mel.shape[-1]))


def waveform_padded_mel(audio: np.ndarray | Tensor, n_mels: int = 80) -> Tensor:
    """transformers' WhisperFeatureExtractor convention: zero-pad the waveform to 30 s first."""
    audio = torch.as_tensor(audio, dtype=torch.float32)[..., :N_SAMPLES]
    audio = torch.nn.functional.pad(audio, (0, N_SAMPLES - audio.shape[-1]))
    return _log_mel(audio, n_mels)


class AudioFileError(Exception):
    """A file can't be read as audio (missing, unreadable, empty or not audio)."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples of an audio file at `sample_rate`.

    soundfile reads WAV/FLAC/OGG (and whatever else its libsndfile knows); other formats go
    through ffmpeg when it is installed.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"{path}: no such file")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as exc:  # error_string: its message without the path again
        audio = _load_with_ffmpeg(path, sample_rate, reason=exc.error_string)
    else:
        audio = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
        if rate != sample_rate and audio.size:
            audio = soxr.resample(audio, rate, sample_rate, quality="HQ")
    if audio.size == 0:
        raise AudioFileError(f"{path}: the file holds no audio samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _load_with_ffmpeg(path: Path, sample_rate: int, reason: str) -> np.ndarray:
    """Decode with the ffmpeg binary (mono float32 at `sample_rate`), for what libsndfile can't read."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioFileError(f"{path}: not readable as WAV/FLAC/OGG ({reason}); install ffmpeg to read other formats")
    command = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path)]
    command += ["-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise AudioFileError(f"{path}: not an audio file ffmpeg can read ({reason})")
    return np.frombuffer(result.stdout, "<f4").astype(np.float32)
