"""The audio tower: chunked conv stem, windowed bidirectional Transformer, ``ln_post`` and projector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AudioEncoderConfig, encoder_windows, num_audio_tokens
from .compute import slow_half
from .llm import Linear

# 100-frame chunks per conv call. On CPU small batches are as fast (cache-friendly) and bound the memory
# (4 chunks: 12 MB per bf16 activation at 480 channels); GPUs want the official conv_chunksize.
CONV_BATCH = {"cpu": 4, "cuda": 500}
FP16_CLAMP = 65504.0 - 1000.0  # the official encoder clamps float16 activations to this range


def sinusoids(length: int, channels: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoid position table ``[length, channels]`` (float32): ``[sin | cos]``, not interleaved."""
    half = channels // 2
    increment = math.log(10000.0) / (half - 1)
    inv = torch.exp(-increment * torch.arange(half, dtype=torch.float32, device=device))
    scaled = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class EncoderAttention(nn.Module):
    """Multi-head self-attention with biases, run on a batch of attention windows."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x [windows, W, dim]``; ``mask [windows, 1, 1, W]`` (True = key is real) or ``None``."""
        b, w, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, w, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, w, d))


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            x = x.clamp(-FP16_CLAMP, FP16_CLAMP)
        return x


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs in float32 on CPUs without native half products (:mod:`.compute`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        weight = self.conv_out.weight
        mel = mel.to(device=weight.device, dtype=weight.dtype)
        parts = self._chunks(mel).split(CONV_BATCH.get(mel.device.type, 8))
        h = torch.cat([self._stem_batch(part) for part in parts])
        h = h + sinusoids(h.shape[1], h.shape[2], h.device).to(h.dtype)
        return h.reshape(-1, h.shape[2])[: num_audio_tokens(mel.shape[1], self.cfg.chunk_frames)]

    def _windows(self, x: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``[N_a, d]`` -> padded attention windows ``[n, W, d]`` and their key mask."""
        bounds = encoder_windows(frames, self.cfg)
        width, count, total = bounds[1], len(bounds) - 1, x.shape[0]
        if count * width == total:
            return x.view(count, width, -1), None
        windows = F.pad(x, (0, 0, 0, count * width - total)).view(count, width, -1)
        lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)], device=x.device)
        mask = torch.arange(width, device=x.device)[None, :] < lengths[:, None]
        return windows, mask[:, None, None, :]

    def _layers(self, mel: torch.Tensor, states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Conv stem and Transformer layers: ``[N_a, d_model]`` before ``ln_post``; optionally records states."""
        x = self.conv_stem(mel)
        total = x.shape[0]
        windows, mask = self._windows(x, mel.shape[1])
        if states is not None:
            states.append(x)
        for layer in self.layers:
            windows = layer(windows, mask)
            if states is not None:
                states.append(windows.reshape(-1, windows.shape[2])[:total])
        return windows.reshape(-1, windows.shape[2])[:total]

    def hidden_states(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """The conv stem output then each layer's output, every one ``[N_a, d_model]`` (before ``ln_post``)."""
        states: list[torch.Tensor] = []
        self._layers(mel, states)
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
        return self.project(self._layers(mel))
