"""int8 / int4 quantization of the LLM's linear layers with PyTorch's own CPU kernels.

* ``8`` (weight-only int8): symmetric, one scale per output channel; ``aten._weight_int8pack_mm`` for few
  rows (decoding), dequantize-then-matmul for many rows (prefill), where that is faster on CPU.
* ``4`` (weight-only int4): asymmetric (scale + zero point) per group of input channels;
  ``aten._convert_weight_to_int4pack_for_cpu`` / ``aten._weight_int4pack_mm_for_cpu``. CPU only.
* ``"w8a8"`` (int8 weights *and* activations): the same int8 weights, prepacked for fbgemm, which
  multiplies them with each input row quantized on the fly, in integers. On an AVX2 CPU
  without native bf16 it is the fastest mode by far (measured on 40 distinct 3072x1024 weights, 2 cores:
  one row 0.11 ms against 0.22 ms bf16 and 0.37 ms weight-only int8; 150 rows 3.5 ms against 8.4 ms
  float32), at the cost of rounding the activations to 7 bits (see :class:`DynamicInt8Linear`). x86 CPU only.

The weight-only CPU kernels are fast only with bfloat16 activations (float32 inputs take a path ~10x
slower), so those layers compute in bfloat16 whatever the model dtype and cast the result back. Scales are
rounded to bfloat16 *before* the weights are rounded, so the stored scales are exact.
Off the CPU (CUDA), int8 weights are dequantized on the fly: it saves memory, not time (H200, 0.6B:
4.8 against 3.0 ms/token in bf16, 262 MB less GPU memory).
Every layer takes a list of weights ``[out_i, in]`` and computes their concatenated outputs, so fused
q/k/v and gate/up layers are quantized straight from the checkpoint's separate tensors.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BackendError
from .compute import native_half_gemm, scratch

W8A8 = "w8a8"
BITS = (8, 4, W8A8)  # the values of ``quantize``
# Modes whose kernels cost per input row, with no per-call work on the weights: prefilling a batch's
# prompts together saves nothing there. Measured (0.6B, 8 prompts of 140-161 tokens, 2 cores): w8a8
# 5.2-5.7 s one by one against 6.1-6.7 s together, int4 16.0 against 17.9-18.4 s; but int8 13.3-13.6
# against 10.4-10.7 s and bf16 14.5-15.3 against 10.5 s (dequantized / upcast weights, once per call).
# In the whole pipeline (w8a8, 8 clips of 10 s, alternating runs in one process) the difference is
# within this machine's noise: batch 8, 15.8-20.1 s (median of 6: 16.0) against 16.1-18.4 s (17.2);
# batch 4, 18.4-19.4 s against 17.5-19.4 s.
PER_ROW_MODES = (W8A8, 4)
DEQUANT_ROWS = 32  # from this many input rows on, dequantize + dense matmul beats the int8 kernel
GROUP_SIZES = (32,)  # int4 group width (input channels per scale/zero); 32 measured more accurate than 64/128
ROW_BLOCK = 4096  # rows quantized at once (bounds the float32 temporary)
COMPUTE = torch.bfloat16


def _int8_rows(weights: Sequence[torch.Tensor], scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes of the stacked weights and their scales (rounded to ``scale_dtype`` first).

    Written block by block into preallocated outputs through one reused float32 block.
    """
    first = weights[0]
    codes = torch.empty(sum(w.shape[0] for w in weights), first.shape[1], dtype=torch.int8, device=first.device)
    scales = torch.empty(codes.shape[0], dtype=scale_dtype, device=first.device)
    block_rows = min(ROW_BLOCK, max(w.shape[0] for w in weights))
    values = scratch(block_rows * first.shape[1], torch.float32, first.device).view(block_rows, first.shape[1])
    start = 0
    for block in (b for w in weights for b in w.split(ROW_BLOCK)):
        end = start + block.shape[0]
        scale = (block.abs().amax(dim=1).float() / 127.0).clamp(min=1e-12).to(scale_dtype)
        quotient = torch.div(block, scale.float()[:, None], out=values[: block.shape[0]])
        codes[start:end] = quotient.round_().clamp_(-128, 127)
        scales[start:end] = scale
        start = end
    return codes, scales


class Int8Linear(nn.Module):
    """Bias-free linear with int8 weights ``[out, in]`` and one scale per output channel."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.on_cpu = weights[0].device.type == "cpu"
        self.dtype = COMPUTE if self.on_cpu else weights[0].dtype
        codes, scales = _int8_rows(weights, self.dtype)
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if self.on_cpu and rows.shape[0] < DEQUANT_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        else:  # dequantized into a reused buffer; float32 where half GEMM is slow (see .compute)
            wide = self.dtype if native_half_gemm(self.weight.device.type, self.dtype) else torch.float32
            weight = scratch(self.weight.numel(), wide, self.weight.device).view(self.weight.shape)
            y = F.linear(rows.to(wide), weight.copy_(self.weight)) * self.scales
        return y.to(x.dtype).view(*x.shape[:-1], -1)


ACTIVATION_SCALE = 1.0 / 63.0  # a row divided by its peak, [-1, 1], becomes the codes 1..127
ACTIVATION_ZERO = 64


def dynamic_int8_available() -> bool:
    """Whether this PyTorch build has fbgemm's int8 linear with float input and output (x86 builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
    )


class _Packer:
    """Threads packing weights for fbgemm while loading goes on (packing is single-threaded, ~150 M weights/s).

    At most one matrix per thread waits for its turn, so the int8 codes waiting to be packed stay few; a
    full queue waits for whichever matrix finishes first, not the oldest (the output matrix, submitted
    first, takes ~1.5 s on its own).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlx-asr-pack")
        self.pending: set[Future] = set()

    def submit(self, qweight: torch.Tensor) -> Future:
        self.pending = {future for future in self.pending if not future.done()}
        if len(self.pending) >= 2 * self.workers:
            self.pending = wait(self.pending, return_when=FIRST_COMPLETED).not_done
        future = self.pool.submit(_prepack, qweight)
        self.pending.add(future)
        return future


def _prepack(qweight: torch.Tensor) -> Any:
    return torch.ops.quantized.linear_prepack(qweight, None)


@functools.cache
def _packer() -> _Packer:
    return _Packer(max(1, torch.get_num_threads()))


def finish_packing(model: nn.Module) -> None:
    """Wait until every :class:`DynamicInt8Linear` of ``model`` has its packed weight (raises packing errors)."""
    for module in model.modules():
        if isinstance(module, DynamicInt8Linear):
            module.packed  # noqa: B018 (waits)


class DynamicInt8Linear(nn.Module):
    """Linear with int8 weights and int8 activations quantized on the fly (W8A8), CPU only.

    The weights are the same symmetric per-channel int8 codes as :class:`Int8Linear`, prepacked once for
    fbgemm. Each call divides every input row by its largest magnitude and quantizes it to the codes
    1..127 (zero point 64: per-token, symmetric, 7 bits, so that AVX2's 16-bit pair sums cannot saturate);
    fbgemm multiplies in integers with int32 sums and returns float32, which is scaled back per row.
    A row's result depends on that row only, so batched and one-by-one decoding agree exactly, and on no
    thread count. The weights are packed on background threads (:func:`finish_packing` waits for them), so
    that loading goes on meanwhile. An optional ``bias`` (``[out]``) is added in float32 to the rescaled result.
    """

    def __init__(self, weights: Sequence[torch.Tensor], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bias = None if bias is None else bias.detach().float().clone()
        codes, scales = _int8_rows(weights, torch.float32)
        zeros = torch.zeros(codes.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user type, not as fbgemm's input
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(codes, scales.double(), zeros, 0)
        self._packing: Future | None = _packer().submit(qweight)
        self._packed: Any = None

    @property
    def packed(self) -> Any:
        """fbgemm's packed weight (packing runs in the background during loading; this waits for it)."""
        if self._packing is not None:
            self._packed, self._packing = self._packing.result(), None
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        peak = rows.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-30)  # 7-10x faster than vector_norm(inf)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            torch.div(rows, peak), ACTIVATION_SCALE, ACTIVATION_ZERO, self.packed
        )
        y = y.mul_(peak)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def _int4_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..15 ``[out, in]`` (int32), scales and zero points ``[out, in // group]`` (bfloat16)."""
    out_dim, in_dim = weight.shape
    w = weight.view(out_dim, in_dim // group, group)
    low, high = (t.float() for t in torch.aminmax(w, dim=2))
    scale = ((high - low) / 15.0).clamp(min=1e-12).to(COMPUTE)
    zero = (low + 8.0 * scale.float()).to(COMPUTE)  # the kernel dequantizes (q - 8) * scale + zero
    inverse = 1.0 / scale.float()
    offset = 8.0 - zero.float() * inverse
    codes = torch.addcmul(offset[..., None], w, inverse[..., None]).round_().clamp_(0, 15)
    return codes.view(out_dim, in_dim).to(torch.int32), scale, zero


class Int4Linear(nn.Module):
    """Bias-free linear with int4 weights in PyTorch's packed CPU layout and per-group scale/zero."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.group = next(g for g in GROUP_SIZES if weights[0].shape[1] % g == 0)
        parts = [_int4_groups(w, self.group) for w in weights]
        codes, scale, zero = (torch.cat(p) for p in zip(*parts, strict=True))
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(COMPUTE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group, self.scales_zeros)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    @staticmethod
    def supports(weights: Sequence[torch.Tensor]) -> bool:
        """Whether the packed kernel takes this shape (out % 16, in divisible by a group size) on this device."""
        out_dim, in_dim = sum(w.shape[0] for w in weights), weights[0].shape[1]
        on_cpu = weights[0].device.type == "cpu"
        return on_cpu and out_dim % 16 == 0 and any(in_dim % g == 0 for g in GROUP_SIZES)


class QuantEmbedding(nn.Module):
    """Tied embedding + output matrix with an int8 output head.

    Weight-only int8 (no ``table``): one int8 matrix (per-row scales) serves the lookup and the logits.
    W8A8 (``table`` given): the logits come from a :class:`DynamicInt8Linear`, and the lookup reads
    ``table``, the checkpoint's memory-mapped matrix: only the rows looked up become resident, and exact.
    """

    def __init__(self, weight: torch.Tensor, table: torch.Tensor | None = None) -> None:
        super().__init__()
        self.dtype = weight.dtype
        self.table = table
        self.head = Int8Linear([weight]) if table is None else DynamicInt8Linear([weight])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return F.embedding(ids, self.table).to(self.dtype)
        rows = self.head.weight[ids].to(self.head.dtype) * self.head.scales[ids][..., None]
        return rows.to(self.dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``hidden @ W.T`` with the int8 matrix."""
        return self.head(hidden)


def quantized_linear(weights: Sequence[torch.Tensor], bits: int | str) -> nn.Module:
    """The layer of mode ``bits`` computing the stacked ``weights`` (int4 only where the kernel takes the
    shape, else int8)."""
    if bits == W8A8:
        return DynamicInt8Linear(weights)
    if bits == 4 and Int4Linear.supports(weights):
        return Int4Linear(weights)
    return Int8Linear(weights)


def check_audio_w8a8(device: torch.device) -> None:
    """Raise :class:`BackendError` unless the audio tower can run in W8A8 on ``device``."""
    if device.type != "cpu" or not dynamic_int8_available():
        raise BackendError("quantize_audio uses fbgemm's CPU kernels (x86 PyTorch builds, device cpu)")


def check_bits(bits: int | str, device: torch.device) -> None:
    """Raise :class:`BackendError` unless ``bits`` is a quantization mode this device can run."""
    if bits not in BITS:
        raise BackendError(f"quantize must be 8, 4 or w8a8, not {bits!r}")
    if bits == 4 and device.type != "cpu":
        raise BackendError("int4 quantization uses PyTorch's CPU kernels; use quantize=8 on CUDA")
    if bits == W8A8 and (device.type != "cpu" or not dynamic_int8_available()):
        raise BackendError("w8a8 uses fbgemm's CPU kernels (x86 PyTorch builds); use quantize=8 here")


def quantize_layer(layer: nn.Module, bits: int | str) -> None:
    """Quantize one (unfused) decoder layer in place: fused q/k/v and gate/up, o_proj and down_proj."""

    def build(weights: Sequence[torch.Tensor]) -> nn.Module:
        return quantized_linear(weights, bits)

    layer.self_attn.fuse(build)
    layer.mlp.fuse(build)
    layer.self_attn.o_proj = build([layer.self_attn.o_proj.weight])
    layer.mlp.down_proj = build([layer.mlp.down_proj.weight])


def quantize_head(thinker: nn.Module, bits: int | str = 8, table: torch.Tensor | None = None) -> None:
    """The output head to int8: ``lm_head`` when untied (W8A8 in mode ``w8a8``), else the tied embedding
    (W8A8 when given ``table``, the memory-mapped matrix its lookups read; see :class:`QuantEmbedding`)."""
    if thinker.lm_head is not None:
        weights = [thinker.lm_head.weight]
        thinker.lm_head = DynamicInt8Linear(weights) if bits == W8A8 else Int8Linear(weights)
    else:
        thinker.model.embed_tokens = QuantEmbedding(thinker.model.embed_tokens.weight, table)
