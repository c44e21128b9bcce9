"""Whisper-style log-mel features computed with MLX (``mx.fft.rfft``), spec §3.2."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ... import mel
from ...config import HOP_LENGTH, N_FFT

LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0


def _frames(samples: mx.array) -> mx.array:
    """Reflect-pad ``N_FFT // 2`` each side and cut ``[T, N_FFT]`` frames, the last STFT frame dropped."""
    pad = N_FFT // 2
    left = samples[1 : pad + 1][::-1]
    right = samples[-pad - 1 : -1][::-1]
    padded = mx.concatenate([left, samples, right])
    num = samples.shape[0] // HOP_LENGTH
    starts = mx.arange(num) * HOP_LENGTH
    return padded[starts[:, None] + mx.arange(N_FFT)[None, :]]


def log_mel(samples: np.ndarray, n_mels: int = 128) -> mx.array:
    """Log-mel ``[n_mels, T]`` float32 of 16 kHz mono samples, ``T = len // 160`` (short audio padded)."""
    x = mx.array(mel.pad_short(np.asarray(samples, dtype=np.float32)))
    spec = mx.fft.rfft(_frames(x) * mx.array(mel.hann_window()), axis=-1)
    power = mx.square(mx.abs(spec))
    energies = power @ mx.array(mel.mel_filters(n_mels))
    logs = mx.log10(mx.maximum(energies, LOG_FLOOR))
    logs = mx.maximum(logs, logs.max() - DYNAMIC_RANGE)
    return ((logs + 4.0) / 4.0).T
