"""Whisper's log-mel front end: 16 kHz audio -> normalised 80-bin (or 128-bin) log-mel frames.

Two ways of filling the 30 s window exist and they give different tokens on the same weights
(reference notes): transformers pads the *waveform* with zeros before the STFT; faster-whisper
computes the clip's own log-mel and pads the *normalised* log-mel with 0.0. We use the
faster-whisper convention (`clip_mel` + `pad_mel`) because it lets the encoder run on a
shortened window, and keep `waveform_padded_mel` for checking against transformers.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
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
