"""How products are computed on this machine: scratch buffers and float32 for wide products on CPUs without bf16.

On a CPU whose oneDNN has no native bfloat16/float16 matrix product (x86 without AVX512-BF16 or AMX,
for example AVX2-only AMD EPYC), PyTorch's half-precision GEMM and convolution fall back to slow
reference loops. Measured on such a 2-core machine: a [150, 1024] x [1024, 6144] product takes 56 ms in
bfloat16 and 17 ms in float32 including the bf16 -> f32 weight copy; the encoder's 480-channel 3x3 conv
of one 10 s clip 12.8 s in bfloat16 and 0.34 s in float32. One-row products (decoding) stay fast in
bfloat16. So on such CPUs the many-row products of a half-precision model upcast weights into a reused
float32 buffer (:func:`scratch`) and compute in float32; everything else keeps the model dtype.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

WIDE_ROWS = 16  # from this many rows on, a half-precision product without native support runs in float32
_SCRATCH = threading.local()


@functools.cache
def native_half_gemm(device_type: str) -> bool:
    """Whether half-precision matrix products are fast on this device type (always on CUDA).

    ``MLX_ASR_CPU_HALF=native|float32`` overrides the CPU probe (oneDNN's bf16 support check).
    """
    if device_type != "cpu":
        return True
    forced = os.environ.get("MLX_ASR_CPU_HALF", "").lower()
    if forced in ("native", "float32"):
        return forced == "native"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older or stripped builds
        return False


def slow_half(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is half precision on a device without native half products."""
    return weight.dtype in (torch.bfloat16, torch.float16) and not native_half_gemm(weight.device.type)


def upcast_wide(weight: torch.Tensor, rows: int) -> bool:
    """Whether a ``rows``-row product with ``weight`` should run in float32 (see the module docstring)."""
    return rows >= WIDE_ROWS and slow_half(weight)


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of ``numel`` elements, reused by later calls of this thread (do not keep it).

    Fresh multi-MB tensors come from new ``mmap`` pages, and faulting them in costs more than the work done
    on them (measured: int8 -> bfloat16 of a 12288x2048 weight 24 ms into a new tensor, 2.6 ms into this buffer).
    """
    store = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (dtype, str(device), torch.is_inference_mode_enabled())  # inference tensors can't be written outside
    buffer = store.get(key)
    if buffer is None or buffer.numel() < numel:
        store.pop(key, None)
        buffer = store[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def release_scratch() -> None:
    """Drop this thread's scratch buffers (after loading: the quantization temporaries)."""
    _SCRATCH.__dict__.pop("buffers", None)


def float32_copy(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as float32 in this thread's scratch buffer (valid until the next :func:`scratch` call)."""
    return scratch(weight.numel(), torch.float32, weight.device).view(weight.shape).copy_(weight)
