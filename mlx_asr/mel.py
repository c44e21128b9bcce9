"""Constants of the Whisper-style log-mel front end, shared by both backends (numpy, float64 -> float32)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .config import HOP_LENGTH, N_FFT, SAMPLE_RATE

MIN_SAMPLES = N_FFT  # shorter audio is zero-padded to one FFT window (the official code cannot reflect-pad it)


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp(np.log(6.4) * (mels[log_region] - 15.0) / 27.0)
    return freq


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 128) -> np.ndarray:
    """Slaney-normalised triangular filters ``[n_fft // 2 + 1, n_mels]`` from 0 to 8 kHz, float32."""
    n_freqs = N_FFT // 2 + 1
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, n_freqs)
    mel_points = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([8000.0]))[0], n_mels + 2)
    filter_freqs = _mel_to_hz(mel_points)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels])
    return filters.astype(np.float32)


@lru_cache(maxsize=1)
def hann_window() -> np.ndarray:
    """Periodic Hann window of ``N_FFT`` samples (``torch.hann_window(400)``), float32."""
    n = np.arange(N_FFT, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)


def num_frames(num_samples: int) -> int:
    """Mel frames of a waveform: the centred STFT's frames minus the dropped last one."""
    return max(num_samples, MIN_SAMPLES) // HOP_LENGTH


def pad_short(samples: np.ndarray) -> np.ndarray:
    """Zero-pad audio shorter than one FFT window so it can be reflect-padded and framed."""
    if samples.shape[-1] >= MIN_SAMPLES:
        return samples
    return np.pad(samples, (0, MIN_SAMPLES - samples.shape[-1]))
