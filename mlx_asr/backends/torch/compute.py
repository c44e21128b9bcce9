"""How products are computed on this machine: scratch buffers and float32 for wide products on CPUs without bf16.

On a CPU whose oneDNN has no native bfloat16/float16 matrix product (x86 without AVX512-BF16 or AMX,
for example AVX2-only AMD EPYC), PyTorch's half-precision GEMM and convolution fall back to slow
reference loops. Measured on such a 2-core machine: a [150, 1024] x [1024, 6144] product takes 56 ms in
bfloat16 and 17 ms in float32 including the bf16 -> f32 weight copy; the encoder's 480-channel 3x3 conv
of one 10 s clip 12.8 s in bfloat16 and 0.34 s in float32. One-row products (decoding) stay fast in
bfloat16. So on such CPUs the many-row products of a half-precision model upcast weights into a reused
float32 buffer (:func:`scratch`) and compute in float32; everything else keeps the model dtype.
The probe is per dtype: a CPU may have native bfloat16 and no native float16 products (AMD Zen 4, AVX512-BF16
without AVX512-FP16: a [150, 1024] x [1024, 6144] product takes 5 ms in bfloat16, 15 ms in float32, 50 ms in
float16).

Where oneDNN does have native half products, it is the slow choice for a *one-row* product (decoding one
sequence): on that Zen 4 machine a [1, 1024] x [1024, 3072] bfloat16 product takes 0.45 ms through oneDNN and
0.27 ms through PyTorch's own gemv, while from two rows on oneDNN wins (2 rows 0.48 against 0.60 ms, 8 rows 0.51
against 1.75 ms). :func:`one_row_products` switches oneDNN off around such a step. On an Intel Xeon with AMX
(Sapphire Rapids class) it is the other way round: oneDNN's one-row bfloat16 products read their weights ≈1.7x
faster (2 cores: [1, 1024] x [1024, 3072] 0.36 against 0.61 ms, the 151936-row output head 16 against 25 ms), so
there oneDNN stays on (:func:`onednn_one_row`).

:func:`limited_threads` runs a stretch of small kernels on fewer threads, where waking the pool's sleeping workers
costs more than they save (see :class:`~mlx_asr.backends.torch.llm.Decoder`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch

WIDE_ROWS = 16  # from this many rows on, a half-precision product without native support runs in float32
_SCRATCH = threading.local()


@functools.cache
def native_half_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bfloat16 or float16) matrix products are fast on this device type (always on CUDA).

    ``MLX_ASR_CPU_HALF=native|float32`` overrides the CPU probe (oneDNN's support check for ``dtype``).
    """
    if device_type != "cpu":
        return True
    forced = os.environ.get("MLX_ASR_CPU_HALF", "").lower()
    if forced in ("native", "float32"):
        return forced == "native"
    name = "_is_mkldnn_fp16_supported" if dtype == torch.float16 else "_is_mkldnn_bf16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # pragma: no cover - older or stripped builds
        return False


def slow_half(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is half precision on a device without native products in its dtype."""
    return weight.dtype in (torch.bfloat16, torch.float16) and not native_half_gemm(weight.device.type, weight.dtype)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def onednn_one_row() -> bool:
    """Whether oneDNN is the fast path for one-row half-precision products on this CPU (see the module docstring).

    Measured faster on an Intel Xeon with AMX and slower on AMD Zen 4, so AMX (``amx_bf16``) decides;
    ``MLX_ASR_ONE_ROW=onednn|pytorch`` overrides.
    """
    forced = os.environ.get("MLX_ASR_ONE_ROW", "").lower()
    if forced in ("onednn", "pytorch"):
        return forced == "onednn"
    return "amx_bf16" in _cpu_flags()


@contextlib.contextmanager
def one_row_products(device: torch.device) -> Iterator[None]:
    """oneDNN off for the products inside (CPU only, unless :func:`onednn_one_row`): for a step whose products
    all have one row.

    oneDNN is PyTorch's process-wide switch: a product in another thread meanwhile takes the slower path,
    nothing worse. A no-op where the user already turned oneDNN off, and off the CPU.
    """
    with _switched_off(torch.backends.mkldnn, "enabled", device.type == "cpu" and not onednn_one_row()):
        yield


@contextlib.contextmanager
def _switched_off(owner: object, flag: str, applies: bool) -> Iterator[None]:
    """PyTorch's process-wide switch ``owner.flag`` off inside, then on again; a no-op unless ``applies`` and on."""
    if not applies or not getattr(owner, flag):
        yield
        return
    setattr(owner, flag, False)
    try:
        yield
    finally:
        setattr(owner, flag, True)


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


@contextlib.contextmanager
def limited_threads(count: int | None, device: torch.device) -> Iterator[None]:
    """At most ``count`` PyTorch CPU threads inside (``None``, or off the CPU: unchanged)."""
    before = torch.get_num_threads()
    if count is None or device.type != "cpu" or count >= before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def float32_convolutions(device: torch.device) -> Iterator[None]:
    """cuDNN's float32 convolutions in full float32 inside (PyTorch lets them round to TF32 by default); CUDA only.

    A float32 model is the exact one: its tokens must match the official float32 outputs.
    """
    with _switched_off(torch.backends.cudnn, "allow_tf32", device.type == "cuda"):
        yield
