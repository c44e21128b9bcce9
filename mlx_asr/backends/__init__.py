"""Backend selection: MLX (Apple Silicon, or MLX's CPU backend) and PyTorch (CPU, CUDA)."""

from __future__ import annotations

import importlib.util
import platform

from ..checkpoint import Checkpoint
from ..errors import BackendError
from .base import DTYPES, Backend, Step

BACKENDS = ("mlx", "torch")
DEVICES = ("cpu", "metal", "cuda")
TORCH_MISSING = "the torch backend needs PyTorch: pip install 'mlx-asr[torch]'"

__all__ = ["BACKENDS", "DEVICES", "DTYPES", "Backend", "Step", "create_backend", "resolve_backend"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None (blocked) or a broken install
        return False


def _is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def resolve_backend(backend: str | None, device: str | None) -> tuple[str, str]:
    """Pick ``(backend, device)``: MLX on Apple Silicon, else PyTorch (CUDA if present), else MLX on CPU."""
    if backend not in (None, "auto", *BACKENDS):
        raise BackendError(f"unknown backend {backend!r}; choose mlx or torch")
    if device not in (None, "auto", *DEVICES):
        raise BackendError(f"unknown device {device!r}; choose cpu, metal or cuda")
    device = None if device == "auto" else device
    if backend in (None, "auto"):
        if device == "cuda":
            backend = "torch"
        elif device == "metal" or (_is_apple_silicon() and _installed("mlx")):
            backend = "mlx"
        elif _installed("torch"):
            backend = "torch"
        elif _installed("mlx"):
            backend = "mlx"
        else:
            raise BackendError("no backend installed: pip install 'mlx-asr[mlx]' or 'mlx-asr[torch]'")
    if backend == "mlx" and device == "cuda":
        raise BackendError("--device cuda needs the torch backend")
    if backend == "torch" and device == "metal":
        raise BackendError("--device metal needs the mlx backend")
    if device is None:
        device = _default_device(backend)
    return backend, device


def _default_device(backend: str) -> str:
    if backend == "mlx":
        return "metal" if _is_apple_silicon() else "cpu"
    if not _installed("torch"):
        raise BackendError(TORCH_MISSING)
    from .torch.openmp import configure_openmp

    configure_openmp()  # must run before PyTorch loads
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def create_backend(checkpoint: Checkpoint, backend: str, device: str, dtype: str, **options) -> Backend:
    """Instantiate a backend; raises :class:`BackendError` if its library is missing."""
    if dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if backend == "mlx":
        if not _installed("mlx"):
            raise BackendError("the mlx backend needs MLX: pip install 'mlx-asr[mlx]' (Linux: 'mlx[cpu]')")
        from .mlx import MlxBackend

        return MlxBackend(checkpoint, dtype=dtype, device=device, **options)
    if checkpoint.is_quantized:
        raise BackendError(
            f"{checkpoint.path} holds MLX-quantized weights, which only the mlx backend loads; use --backend mlx, "
            "or convert without --quantize for a folder both backends load"
        )
    if not _installed("torch"):
        raise BackendError(TORCH_MISSING)
    from .torch import TorchBackend

    return TorchBackend(checkpoint, dtype=dtype, device=device, **options)
