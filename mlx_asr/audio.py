"""Audio input: any file soundfile (or ffmpeg) reads, raw bytes or arrays -> float32 mono 16 kHz.

Mirrors the official ``normalize_audios``: decode at the native rate, average the channels,
resample with soxr (librosa's ``soxr_hq`` with its length fix-up), divide by the peak when it
exceeds 1 and clip to [-1, 1].
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from pathlib import Path
from typing import Union

import numpy as np

from .config import SAMPLE_RATE
from .errors import AudioError

AudioInput = Union[str, Path, bytes, np.ndarray, tuple]  # noqa: UP007 (typer/py3.9 friendly alias)


def _read_soundfile(data: str | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        samples, rate = sf.read(data, dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioError(f"{name}: not a readable audio file ({exc.error_string})") from exc
    except (RuntimeError, ValueError, EOFError) as exc:
        raise AudioError(f"{name}: corrupt or unsupported audio ({exc})") from exc
    return samples.T, int(rate)


def _read_ffmpeg(data: bytes, name: str) -> tuple[np.ndarray, int] | None:
    """Decode formats libsndfile lacks (m4a, aac, opus in mp4, video files) when ffmpeg is installed."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", "pipe:0", "-f", "wav", "-acodec", "pcm_f32le", "pipe:1"]
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        return None
    return _read_soundfile(io.BytesIO(proc.stdout), name)


def _decode(data: bytes, name: str) -> tuple[np.ndarray, int]:
    if not data:
        raise AudioError(f"{name}: empty file")
    try:
        return _read_soundfile(io.BytesIO(data), name)
    except AudioError:
        decoded = _read_ffmpeg(data, name)
        if decoded is None:
            raise
        return decoded


def _read_path(path: Path) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, expected an audio file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror})") from exc
    return _decode(data, str(path))


def _as_channels_first(samples: np.ndarray) -> np.ndarray:
    """Official ``to_mono`` layout rule: a 2-D array with few rows and more columns is channels-first."""
    if samples.ndim == 1:
        return samples[None, :]
    if samples.ndim != 2:
        raise AudioError(f"audio array must be 1-D or 2-D, got shape {samples.shape}")
    if samples.shape[0] <= 8 and samples.shape[1] > samples.shape[0]:
        return samples
    return samples.T


def _from_array(samples: np.ndarray, rate: int | None) -> tuple[np.ndarray, int]:
    if rate is None:
        raise AudioError("a numpy audio array needs its sample rate: pass (array, sample_rate)")
    return _as_channels_first(to_float32(samples)), int(rate)


def to_float32(samples: np.ndarray) -> np.ndarray:
    """Float32 samples of a float, int16 or int32 array (integers scaled to [-1, 1))."""
    samples = np.asarray(samples)
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype == np.int32:
        return samples.astype(np.float32) / 2147483648.0
    if not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"unsupported audio array dtype {samples.dtype}")
    return samples.astype(np.float32, copy=False)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 audio with soxr HQ to ``target`` Hz, length ``ceil(n * target / rate)``."""
    if rate == target:
        return samples
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    import soxr

    out = soxr.resample(samples, rate, target, quality="soxr_hq").astype(np.float32, copy=False)
    length = int(math.ceil(samples.shape[-1] * target / rate))
    if out.shape[-1] >= length:
        return out[:length]
    return np.pad(out, (0, length - out.shape[-1]))


def normalize(samples: np.ndarray) -> np.ndarray:
    """Official float-range normalisation: divide by the peak if it is above 1, then clip to [-1, 1]."""
    if samples.size == 0:
        return samples
    peak = float(np.max(np.abs(samples)))
    if peak > 1.0:
        samples = samples / peak
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def load_audio(source: AudioInput, sample_rate: int | None = None) -> np.ndarray:
    """Decode ``source`` to float32 mono samples at 16 kHz, normalised as the official package does.

    ``source`` is a file path, the bytes of an audio file, a numpy array (with ``sample_rate``) or a
    ``(array, sample_rate)`` tuple. Raises :class:`AudioError` with one clear line on bad input.
    """
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("an audio tuple must be (array, sample_rate)")
        source, sample_rate = source
    if isinstance(source, np.ndarray):
        channels, rate = _from_array(source, sample_rate)
        name = "audio array"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        channels, rate = _decode(bytes(source), "audio bytes")
        name = "audio bytes"
    elif isinstance(source, (str, Path)):
        channels, rate = _read_path(Path(source))
        name = str(source)
    else:
        raise AudioError(f"unsupported audio input of type {type(source).__name__}")
    if channels.shape[-1] == 0:
        raise AudioError(f"{name}: empty audio (no samples)")
    mono = channels.mean(axis=0) if channels.shape[0] > 1 else channels[0]
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    return normalize(resample(np.ascontiguousarray(mono, dtype=np.float32), rate))


def duration(samples: np.ndarray) -> float:
    """Duration in seconds of 16 kHz samples."""
    return samples.shape[-1] / SAMPLE_RATE
