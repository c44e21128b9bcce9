"""Constants of the Whisper-style log-mel front end, shared by both backends (numpy, float64 -> float32)."""

from __future__ import annotations

import base64
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


# ``torch.hann_window(400, periodic=True)`` exactly: little-endian float32, base64. The reference (the official
# feature extractor) computes ``0.5 - 0.5 * cos(2 pi n / 400)`` with a vectorised float32 cosine whose last bit
# differs from a correctly rounded one, so no numpy formula reproduces all 400 values (12 differ by 1 ulp).
_HANN_400 = (
    "AAAAAABggTgAXIE5AIIROgBSgToAB8o6AG0ROwDjRTtAMYE7wHOjO8C2yTsA+PM7YBoRPOA0KjxASkU8gFhiPPCugDxALJE8EKOiPGAS"
    "tTzweMg8oNXcPAAn8jzwNQQ9WNEPPRDlGz1AcCg9OHI1PQjqQj3w1lA9+DdfPUgMbj3wUn09eIWGPaSZjj2A5ZY9hGifPSAiqD3MEbE9"
    "+Da6PQyRwz14H809nOHWPdzW4D2U/uo9JFj1PeTi/z0UTwU+osQKPsBRED4a9hU+UrEbPgyDIT7oaic+imgtPo57Mz6Sozk+NOA/Pg4x"
    "Rj64lUw+0A1TPuqYWT6cNmA+fOZmPh6obT4Ue3Q+7l57PqApgT7Mq4Q+wjWIPkjHiz4nYI8+IgCTPgCnlj6GVJo+dgiePpfCoT6sgqU+"
    "eUipPsATrT5E5LA+xrm0PgqUuD7Scrw+3VXAPu48xD7FJ8g+IxbMPsgH0D52/NM+6/PXPuft2z4r6t8+dujjPofo5z4d6us++OzvPtXw"
    "8z539fc+nPr7PgAAAD+zAgI/RQUEP5YHBj+GCQg/8woKP74LDD/HCw4/7AoQPw4JEj8MBhQ/xwEWPx38Fz/w9Bk/H+wbP4vhHT8T1R8/"
    "mcYhP/u1Iz8eoyU/340nPyF2KT/EWys/qj4tP7UeLz/G+zA/v9UyP4KsND/wfzY/7k84P10cOj8h5Ts/HKo9PzJrPz9GKEE/POFCP/qV"
    "RD9iRkY/WvJHP8eZST+OPEs/k9pMP75zTj/1B1A/HpdRPx4hUz/gpVQ/SCVWPz6fVz+tE1k/eoJaP5DrWz/YTl0/PKxeP6QDYD/8VGE/"
    "LqBiPyXlYz/NI2U/ElxmP96NZz8iuWg/x91pP7z7aj/wEmw/UCNtP8wsbj9SL28/0ipwPzwfcT+BDHI/kvJyP2DRcz/eqHQ//Hh1P7BB"
    "dj/rAnc/orx3P8hueD9UGXk/Obx5P25Xej/o6no/nnZ7P4n6ez+ednw/2Op8PyxXfT+Xu30/EBh+P5Jsfj8YuX4/nv1+Px06fz+Tbn8/"
    "/Jp/P1e/fz+g238/1O9/P/X7fz8AAIA/9ft/P9Tvfz+g238/V79/P/yafz+Tbn8/HDp/P539fj8YuX4/kmx+PxAYfj+Wu30/LFd9P9fq"
    "fD+ednw/iPp7P552ez/n6no/bFd6Pzi8eT9SGXk/yG54P6C8dz/qAnc/rkF2P/t4dT/cqHQ/XtFzP5Dycj+ADHI/Oh9xP9AqcD9QL28/"
    "yixuP1AjbT/wEmw/vPtqP8bdaT8guWg/3o1nPxBcZj/MI2U/JOVjPy2gYj/7VGE/owNgPzqsXj/XTl0/j+tbP3iCWj+qE1k/PJ9XP0Ul"
    "Vj/dpVQ/HCFTPxqXUT/yB1A/vHNOP5DaTD+KPEs/xJlJP1jyRz9gRkY/95VEPzrhQj9DKEE/Lms/PxmqPT8e5Ts/Whw6P+tPOD/tfzY/"
    "fqw0P7zVMj/D+zA/sh4vP6c+LT/BWys/HnYpP9yNJz8aoyU/+LUjP5TGIT8P1R8/huEdPxvsGz/s9Bk/GfwXP8IBFj8IBhQ/CgkSP+gK"
    "ED/CCw4/ugsMP+8KCj+BCQg/kgcGP0EFBD+yAgI/AAAAP5v6+z529fc+1PDzPvXs7z4a6us+hOjnPnPo4z4o6t8+5O3bPujz1z5z/NM+"
    "xgfQPiAWzD7CJ8g+6zzEPtpVwD7Pcrw+CJS4PsS5tD5B5LA+vROtPnZIqT6qgqU+lMKhPnIInj6CVJo+/KaWPh4Akz4iYI8+RMeLPr41"
    "iD7Iq4Q+nCmBPuZeez4Ke3Q+FqhtPnTmZj6UNmA+4phZPsgNUz6wlUw+BDFGPirgPz6Iozk+hHszPoBoLT7gaic+AoMhPkqxGz4S9hU+"
    "uFEQPpjECj4KTwU+1OL/PRRY9T2E/uo9zNbgPYzh1j1oH809/JDDPeg2uj28EbE9ECKoPXBonz1w5ZY9lJmOPWiFhj3QUn09MAxuPeA3"
    "Xz3Q1lA98OlCPRhyNT0ocCg98OQbPUDRDz3QNQQ90CbyPHDV3DzQeMg8MBK1PPCiojwQLJE80K6APGBYYjwgSkU84DQqPEAaETwA+PM7"
    "wLbJO8BzoztAMYE7AONFOwBtETsABso6AFKBOgCCEToAXIE5AGCBOA=="
)


@lru_cache(maxsize=1)
def hann_window() -> np.ndarray:
    """Periodic Hann window of ``N_FFT`` samples, float32, bit-equal to ``torch.hann_window(400)``."""
    window = np.frombuffer(base64.b64decode(_HANN_400), dtype="<f4").astype(np.float32)
    assert window.shape == (N_FFT,)
    return window


def num_frames(num_samples: int) -> int:
    """Mel frames of a waveform: the centred STFT's frames minus the dropped last one."""
    return max(num_samples, MIN_SAMPLES) // HOP_LENGTH


def pad_short(samples: np.ndarray) -> np.ndarray:
    """Zero-pad audio shorter than one FFT window so it can be reflect-padded and framed."""
    if samples.shape[-1] >= MIN_SAMPLES:
        return samples
    return np.pad(samples, (0, MIN_SAMPLES - samples.shape[-1]))
