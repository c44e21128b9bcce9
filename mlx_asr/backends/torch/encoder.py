"""The audio tower: chunked conv stem, windowed bidirectional Transformer, ``ln_post`` and projector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AudioEncoderConfig, Run, batch_runs, encoder_windows, num_audio_tokens, window_runs
from .compute import float32_convolutions, slow_half
from .llm import Linear

# 100-frame chunks per conv call. On CPU small batches are as fast (cache-friendly) and bound the memory
# (4 chunks: 12 MB per bf16 activation at 480 channels); GPUs want the official conv_chunksize.
CONV_BATCH = {"cpu": 4, "cuda": 500}
FP16_CLAMP = 65504.0 - 1000.0  # the official encoder clamps float16 activations to this range
ENCODE_BATCH_TOKENS = 4096  # most audio tokens of several recordings run through the layers together


def sinusoids(length: int, channels: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoid position table ``[length, channels]`` (float32): ``[sin | cos]``, not interleaved."""
    half = channels // 2
    increment = math.log(10000.0) / (half - 1)
    inv = torch.exp(-increment * torch.arange(half, dtype=torch.float32, device=device))
    scaled = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class EncoderAttention(nn.Module):
    """Multi-head self-attention with biases, within attention windows of the unpadded tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, runs: list[Run]) -> torch.Tensor:
        """``x [N, dim]``; ``runs``: the windows (see :func:`~mlx_asr.config.window_runs`), covering ``0..N``."""
        n, d = x.shape
        q, k, v = (proj(x).view(n, self.heads, d // self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        outs = []
        for start, count, width in runs:
            part = (t[start : start + count * width].unflatten(0, (count, width)).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(*part)
            outs.append(out.transpose(1, 2).reshape(count * width, d))
        return self.out_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm Transformer layer with an exact-GELU feed-forward."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = EncoderAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, runs: list[Run]) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), runs)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            x = x.clamp(-FP16_CLAMP, FP16_CLAMP)
        return x


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs in float32 on CPUs without native half products (:mod:`.compute`), and never in
    TF32 when the model is float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            with float32_convolutions(self.weight.device):
                return super().forward(x)
        if not slow_half(self.weight):
            return super().forward(x)
        weight, bias = self.weight.float(), None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), weight, bias).to(x.dtype)


class AudioTower(nn.Module):
    """``thinker.audio_tower``: mel ``[n_mels, T]`` -> audio embeddings ``[N_a, output_dim]``.

    Args:
        cfg: the audio encoder config.
        projector_layers: number of ``projN`` linears after ``ln_post`` (exact GELU between them).
        has_ln_post: whether the checkpoint has ``ln_post``.
    """

    def __init__(self, cfg: AudioEncoderConfig, projector_layers: int = 2, has_ln_post: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        c, d = cfg.downsample_hidden_size, cfg.d_model
        self.conv2d1 = Conv2d(1, c, 3, 2, 1)
        self.conv2d2 = Conv2d(c, c, 3, 2, 1)
        self.conv2d3 = Conv2d(c, c, 3, 2, 1)
        self.conv_out = Linear(c * cfg.freq_after_conv, d, bias=False)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d, eps=1e-5) if has_ln_post else None
        self.projector_layers = projector_layers
        for i in range(1, projector_layers + 1):
            setattr(self, f"proj{i}", Linear(d, cfg.output_dim if i == projector_layers else d))

    def _chunks(self, mel: torch.Tensor) -> torch.Tensor:
        """``[n_chunks, 1, n_mels, width]``: 100-frame chunks, the last zero-padded when there are several."""
        size = self.cfg.chunk_frames
        frames = mel.shape[1]
        if frames <= size:
            return mel[None, None]
        count = -(-frames // size)
        padded = F.pad(mel, (0, count * size - frames))
        return padded.view(mel.shape[0], count, size).permute(1, 0, 2).unsqueeze(1)

    def _stem_batch(self, chunks: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv2d1(chunks))
        h = F.gelu(self.conv2d2(h))
        h = F.gelu(self.conv2d3(h))
        n, c, f, t = h.shape
        # 2-D and contiguous: a permuted 3-D view makes F.linear broadcast (copy) the weight per chunk (bmm)
        return self.conv_out(h.permute(0, 3, 1, 2).reshape(n * t, c * f).contiguous()).view(n, t, -1)

    def conv_stem(self, mel: torch.Tensor) -> torch.Tensor:
        """Conv stem + per-chunk sinusoid positions, padding tokens dropped: ``[N_a, d_model]``."""
        weight = self.conv2d1.weight  # the convolutions are never quantized
        mel = mel.to(device=weight.device, dtype=weight.dtype)
        parts = self._chunks(mel).split(CONV_BATCH.get(mel.device.type, 8))
        h = torch.cat([self._stem_batch(part) for part in parts])
        h = h + sinusoids(h.shape[1], h.shape[2], h.device).to(h.dtype)
        return h.reshape(-1, h.shape[2])[: num_audio_tokens(mel.shape[1], self.cfg.chunk_frames)]

    def layers_over(self, x: torch.Tensor, runs: list[Run], states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Transformer layers over conv-stem rows ``[N, d_model]`` (before ``ln_post``); optionally records states."""
        for layer in self.layers:
            x = layer(x, runs)
            if states is not None:
                states.append(x)
        return x

    def hidden_states(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """The conv stem output then each layer's output, every one ``[N_a, d_model]`` (before ``ln_post``)."""
        x = self.conv_stem(mel)
        states = [x]
        self.layers_over(x, window_runs(encoder_windows(mel.shape[1], self.cfg)), states)
        return states

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj1``..``projN`` with exact GELU between: ``[N_a, output_dim]``."""
        if self.ln_post is not None:
            h = self.ln_post(h)
        for i in range(1, self.projector_layers + 1):
            if i > 1:
                h = F.gelu(h)
            h = getattr(self, f"proj{i}")(h)
        return h

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encode_batch([mel])[0]

    def encode_batch(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Audio embeddings of several mels ``[n_mels, T_i]`` at once: their tokens share every linear's
        matrix product (up to :data:`ENCODE_BATCH_TOKENS` at a time); attention stays within each window."""
        out: list[torch.Tensor] = []
        for members, runs in batch_runs([mel.shape[1] for mel in mels], self.cfg, ENCODE_BATCH_TOKENS):
            stems = [self.conv_stem(mels[i]) for i in members]
            x = torch.cat(stems) if len(stems) > 1 else stems[0]
            out += self.project(self.layers_over(x, runs)).split([s.shape[0] for s in stems])
        return out

    def encode_window(self, stems: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings of conv-stem rows that make up one attention window (cached streaming)."""
        x = torch.cat(stems)
        return self.project(self.layers_over(x, [(0, 1, x.shape[0])]))
