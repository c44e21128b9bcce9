"""Weight-only int8 / int4 quantization of the LLM's linear layers with PyTorch's own CPU kernels.

* int8: symmetric, one scale per output channel; ``aten._weight_int8pack_mm`` for few rows (decoding),
  dequantize-then-matmul for many rows (prefill), where that is faster on CPU.
* int4: asymmetric (scale + zero point) per group of input channels;
  ``aten._convert_weight_to_int4pack_for_cpu`` / ``aten._weight_int4pack_mm_for_cpu``. CPU only.

The CPU kernels are fast only with bfloat16 activations (float32 inputs take a path ~10x slower), so
quantized layers compute in bfloat16 whatever the model dtype and cast the result back. Scales are
rounded to bfloat16 *before* the weights are rounded, so the stored scales are exact.
Off the CPU (CUDA), int8 weights are dequantized on the fly: it saves memory, not time.
Every layer takes a list of weights ``[out_i, in]`` and computes their concatenated outputs, so fused
q/k/v and gate/up layers are quantized straight from the checkpoint's separate tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BackendError
from .compute import native_half_gemm, scratch

BITS = (8, 4)
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
            wide = self.dtype if native_half_gemm(self.weight.device.type) else torch.float32
            weight = scratch(self.weight.numel(), wide, self.weight.device).view(self.weight.shape)
            y = F.linear(rows.to(wide), weight.copy_(self.weight)) * self.scales
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
    """Tied embedding + output matrix stored once in int8 (per-row scales): lookup and logits."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.dtype = weight.dtype
        self.head = Int8Linear([weight])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.weight[ids].to(self.head.dtype) * self.head.scales[ids][..., None]
        return rows.to(self.dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``hidden @ W.T`` with the int8 matrix."""
        return self.head(hidden)


def quantized_linear(weights: Sequence[torch.Tensor], bits: int) -> nn.Module:
    """An int4 layer where the kernel takes the shape, else int8, computing the stacked ``weights``."""
    if bits == 4 and Int4Linear.supports(weights):
        return Int4Linear(weights)
    return Int8Linear(weights)


def check_bits(bits: int, device: torch.device) -> None:
    if bits not in BITS:
        raise BackendError(f"quantize must be 8 or 4 (bits), not {bits!r}")
    if bits == 4 and device.type != "cpu":
        raise BackendError("int4 quantization uses PyTorch's CPU kernels; use quantize=8 on CUDA")


def quantize_layer(layer: nn.Module, bits: int) -> None:
    """Quantize one (unfused) decoder layer in place: fused q/k/v and gate/up, o_proj and down_proj."""

    def build(weights: Sequence[torch.Tensor]) -> nn.Module:
        return quantized_linear(weights, bits)

    layer.self_attn.fuse(build)
    layer.mlp.fuse(build)
    layer.self_attn.o_proj = build([layer.self_attn.o_proj.weight])
    layer.mlp.down_proj = build([layer.mlp.down_proj.weight])


def quantize_head(thinker: nn.Module) -> None:
    """The output head to int8: ``lm_head`` when untied, else the tied embedding (one int8 matrix for both)."""
    if thinker.lm_head is not None:
        thinker.lm_head = Int8Linear([thinker.lm_head.weight])
    else:
        thinker.model.embed_tokens = QuantEmbedding(thinker.model.embed_tokens.weight)


def quantize_thinker(thinker: nn.Module, bits: int) -> None:
    """Quantize the (unfused) LLM in place: transformer linears to ``bits`` (q/k/v and gate/up fused), head int8.

    The audio tower, norms and (untied) input embedding stay in the model dtype. With tied embeddings
    the single int8 matrix serves both the embedding lookup and the output head.
    (:func:`~mlx_asr.backends.torch.model.load_model` with ``quantize`` does the same while it reads
    the checkpoint, one layer at a time, which keeps the peak memory low.)
    """
    check_bits(bits, thinker.model.norm.weight.device)
    for layer in thinker.model.layers:
        quantize_layer(layer, bits)
    quantize_head(thinker)
