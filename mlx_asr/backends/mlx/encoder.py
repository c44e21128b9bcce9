"""The Qwen3-ASR audio tower (AuT encoder) and its projector in MLX, spec §4.

Module and attribute names mirror ``thinker.audio_tower.*`` so the checkpoint loads unchanged
(only the conv weights are transposed to MLX's ``[out, kH, kW, in]`` layout).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import AudioEncoderConfig, encoder_windows, num_audio_tokens

LAYER_NORM_EPS = 1e-5
FP16_CLAMP = 65504.0 - 1000.0
CONV_BATCH = 500  # chunks per conv-stem batch (the official ``conv_chunksize``): bounds peak memory


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Sinusoid position table ``[length, channels]``: sines then cosines, not interleaved (§4.4)."""
    half = channels // 2
    inv = np.exp(-math.log(10000.0) / (half - 1) * np.arange(half, dtype=np.float32))
    angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class AudioAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases, restricted by a key mask."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        batch, length, dims = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dims))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: attention then an exact-GELU feed-forward."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.self_attn = AudioAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(nn.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == mx.float16:
            x = mx.clip(x, -FP16_CLAMP, FP16_CLAMP)
        return x


class AudioTower(nn.Module):
    """Conv stem, windowed transformer encoder, ``ln_post`` and the ``proj1..projN`` projector.

    Args:
        cfg: the audio encoder config.
        projector_layers: number of ``projK`` linears (GELU between them), 1 = a single linear.
        has_ln_post: whether the checkpoint has an ``ln_post`` LayerNorm before the projector.
    """

    def __init__(self, cfg: AudioEncoderConfig, projector_layers: int = 2, has_ln_post: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        channels = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2d2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.conv2d3 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.conv_out = nn.Linear(channels * cfg.freq_after_conv, cfg.d_model, bias=False)
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.encoder_layers)]
        if has_ln_post:
            self.ln_post = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.projector_layers = projector_layers
        for i in range(1, projector_layers + 1):
            out_dims = cfg.output_dim if i == projector_layers else cfg.d_model
            setattr(self, f"proj{i}", nn.Linear(cfg.d_model, out_dims))

    def _chunks(self, mel: mx.array) -> mx.array:
        """Split ``[n_mels, T]`` into NHWC chunks ``[n, n_mels, frames, 1]``, zero-padding the last one."""
        size = self.cfg.chunk_frames
        frames = mel.shape[1]
        if frames <= size:
            return mel[None, :, :, None]
        count = -(-frames // size)
        mel = mx.pad(mel, [(0, 0), (0, count * size - frames)])
        return mel.reshape(mel.shape[0], count, size).transpose(1, 0, 2)[..., None]

    def _conv(self, chunks: mx.array) -> mx.array:
        """Three stride-2 convs + GELU and ``conv_out`` on NHWC chunks -> ``[n, L', d_model]``."""
        h = nn.gelu(self.conv2d1(chunks))
        h = nn.gelu(self.conv2d2(h))
        h = nn.gelu(self.conv2d3(h))
        n, freq, length, channels = h.shape
        # Official flattening: feature index = channel * freq + f.
        return self.conv_out(h.transpose(0, 2, 3, 1).reshape(n, length, channels * freq))

    def stem(self, mel: mx.array) -> mx.array:
        """Conv-stem output ``[N_a, d_model]`` (the input of encoder layer 0) of a ``[n_mels, T]`` mel."""
        chunks = self._chunks(mel.astype(self.conv2d1.weight.dtype))
        h = mx.concatenate([self._conv(chunks[i : i + CONV_BATCH]) for i in range(0, len(chunks), CONV_BATCH)])
        pos = mx.array(sinusoids(h.shape[1], self.cfg.d_model)).astype(h.dtype)
        h = h + pos
        total = num_audio_tokens(mel.shape[1], self.cfg.chunk_frames)
        return h.reshape(-1, h.shape[-1])[:total]

    def hidden_states(self, mel: mx.array) -> list[mx.array]:
        """Conv-stem output then the output of every encoder layer, each ``[N_a, d_model]``."""
        h = self.stem(mel)
        bounds = encoder_windows(mel.shape[1], self.cfg)
        windows, mask = _to_windows(h, bounds)
        states = [h]
        for layer in self.layers:
            windows = layer(windows, mask)
            states.append(windows.reshape(-1, h.shape[-1])[: h.shape[0]])
        return states

    def project(self, h: mx.array) -> mx.array:
        """``ln_post`` (if any) then the projector: ``[N_a, d_model]`` -> ``[N_a, output_dim]``."""
        if "ln_post" in self:
            h = self.ln_post(h)
        for i in range(1, self.projector_layers + 1):
            if i > 1:
                h = nn.gelu(h)
            h = getattr(self, f"proj{i}")(h)
        return h

    def __call__(self, mel: mx.array) -> mx.array:
        """Audio embeddings ``[N_a, output_dim]`` of a ``[n_mels, T]`` log-mel."""
        return self.project(self.hidden_states(mel)[-1])


def _to_windows(h: mx.array, bounds: list[int]) -> tuple[mx.array, mx.array | None]:
    """Pack ``[N, d]`` into attention windows ``[W, size, d]`` plus a key mask for the padded tail."""
    total = h.shape[0]
    size = bounds[1] - bounds[0] if len(bounds) > 1 else total
    count = len(bounds) - 1
    padding = count * size - total
    if padding == 0:
        return h.reshape(count, size, -1), None
    h = mx.pad(h, [(0, padding), (0, 0)])
    valid = mx.arange(count * size).reshape(count, 1, 1, size) < total
    return h.reshape(count, size, -1), valid
