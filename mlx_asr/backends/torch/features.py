"""Whisper-style log-mel features with ``torch.stft`` (always float32)."""

from __future__ import annotations

import numpy as np
import torch

from ...config import HOP_LENGTH, N_FFT
from ...mel import mel_filters, pad_short

_CONSTANTS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(n_mels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hann window and the transposed mel filters ``[n_mels, n_fft // 2 + 1]`` on ``device``."""
    key = (n_mels, str(device))
    if key not in _CONSTANTS:
        window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32).to(device)  # the reference's own
        filters = torch.from_numpy(np.ascontiguousarray(mel_filters(n_mels).T)).to(device)
        _CONSTANTS[key] = (window, filters)
    return _CONSTANTS[key]


def log_mel(samples: np.ndarray, n_mels: int = 128, device: torch.device | str = "cpu") -> torch.Tensor:
    """Log-mel features ``[n_mels, T]`` (float32) of 16 kHz mono samples, ``T = len // 160``.

    Reflect-centred STFT (n_fft 400, hop 160, periodic Hann), last frame dropped, power spectrum,
    Slaney mel filters, ``log10`` clamped at 1e-10, floored at ``max - 8``, then ``(x + 4) / 4``.
    """
    device = torch.device(device)
    window, filters = _constants(n_mels, device)
    audio = torch.from_numpy(np.ascontiguousarray(pad_short(np.asarray(samples, dtype=np.float32))))
    stft = torch.stft(
        audio.to(device), N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
