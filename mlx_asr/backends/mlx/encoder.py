"""The Qwen3-ASR audio tower (AuT encoder) and its projector in MLX, spec §4.

Module and attribute names mirror ``thinker.audio_tower.*`` so the checkpoint loads unchanged
(only the conv weights are transposed to MLX's ``[out, kH, kW, in]`` layout).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import AudioEncoderConfig, Run, batch_runs, encoder_windows, num_audio_tokens, window_runs

LAYER_NORM_EPS = 1e-5
FP16_CLAMP = 65504.0 - 1000.0
CONV_BATCH = 500  # chunks per conv-stem batch (the official ``conv_chunksize``): bounds peak memory
ENCODE_BATCH_TOKENS = 4096  # most audio tokens of several recordings run through the layers together


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Sinusoid position table ``[length, channels]``: sines then cosines, not interleaved (§4.4)."""
    half = channels // 2
    inv = np.exp(-math.log(10000.0) / (half - 1) * np.arange(half, dtype=np.float32))
    angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class AudioAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases, within attention windows of the unpadded tokens."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, runs: list[Run]) -> mx.array:
        """``x [N, dims]``; ``runs``: the windows (see :func:`~mlx_asr.config.window_runs`), covering ``0..N``."""
        n, dims = x.shape
        q, k, v = (proj(x).reshape(n, self.heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        outs = []
        for start, count, width in runs:
            part = (t[start : start + count * width].reshape(count, width, self.heads, -1).transpose(0, 2, 1, 3)
                    for t in (q, k, v))
            out = mx.fast.scaled_dot_product_attention(*part, scale=self.scale)
            outs.append(out.transpose(0, 2, 1, 3).reshape(count * width, dims))
        return self.out_proj(outs[0] if len(outs) == 1 else mx.concatenate(outs))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: attention then an exact-GELU feed-forward."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.self_attn = AudioAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)

    def __call__(self, x: mx.array, runs: list[Run]) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), runs)
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

    def layers_over(self, h: mx.array, runs: list[Run], states: list[mx.array] | None = None) -> mx.array:
        """Transformer layers over conv-stem rows ``[N, d_model]`` (before ``ln_post``); optionally records states."""
        for layer in self.layers:
            h = layer(h, runs)
            if states is not None:
                states.append(h)
        return h

    def hidden_states(self, mel: mx.array) -> list[mx.array]:
        """Conv-stem output then the output of every encoder layer, each ``[N_a, d_model]``."""
        h = self.stem(mel)
        states = [h]
        self.layers_over(h, window_runs(encoder_windows(mel.shape[1], self.cfg)), states)
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
        return self.encode_batch([mel])[0]

    def encode_batch(self, mels: list[mx.array]) -> list[mx.array]:
        """Audio embeddings of several log-mels ``[n_mels, T_i]``: their tokens share every linear's matrix
        product (up to :data:`ENCODE_BATCH_TOKENS` at a time); attention stays within each window."""
        out: list[mx.array] = []
        for members, runs in batch_runs([mel.shape[1] for mel in mels], self.cfg, ENCODE_BATCH_TOKENS):
            stems = [self.stem(mels[i]) for i in members]
            h = self.project(self.layers_over(mx.concatenate(stems) if len(stems) > 1 else stems[0], runs))
            ends = np.cumsum([s.shape[0] for s in stems])[:-1].tolist()
            out += mx.split(h, ends) if ends else [h]
        return out

    def encode_window(self, stems: list[mx.array]) -> mx.array:
        """Embeddings of conv-stem rows that make up one attention window (cached streaming)."""
        h = mx.concatenate(stems)
        return self.project(self.layers_over(h, [(0, 1, h.shape[0])]))
