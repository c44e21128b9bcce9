"""Model configuration read from a Qwen3-ASR ``config.json`` (never from class defaults)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
# Chunking of the mel time axis in the audio tower: 2 * n_window frames per chunk.
CONV_DOWNSAMPLE = 8


@dataclass(frozen=True)
class AudioEncoderConfig:
    """``thinker_config.audio_config``: the AuT encoder."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    output_dim: int
    downsample_hidden_size: int
    n_window: int
    n_window_infer: int
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    @property
    def chunk_frames(self) -> int:
        """Mel frames per convolution chunk (100 in the official checkpoints)."""
        return 2 * self.n_window

    @property
    def window_chunks(self) -> int:
        """Chunks per attention window (8 in the official checkpoints = 8 s)."""
        return self.n_window_infer // self.chunk_frames

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def freq_after_conv(self) -> int:
        """Mel bins left after the three stride-2 convolutions (128 -> 16)."""
        f = self.num_mel_bins
        for _ in range(3):
            f = (f - 1) // 2 + 1
        return f


@dataclass(frozen=True)
class TextConfig:
    """``thinker_config.text_config``: the Qwen3 decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"


@dataclass(frozen=True)
class ModelConfig:
    """Everything the pipeline needs from ``config.json``."""

    audio: AudioEncoderConfig
    text: TextConfig
    audio_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    dtype: str
    support_languages: tuple[str, ...] = field(default_factory=tuple)
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


_AUDIO_KEYS = (
    "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
    "output_dim", "downsample_hidden_size", "n_window", "n_window_infer",
)
_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
)


def _require(section: dict[str, Any], keys: tuple[str, ...], where: str) -> dict[str, Any]:
    missing = [k for k in keys if k not in section]
    if missing:
        raise ModelError(f"config.json: {where} lacks {', '.join(missing)}")
    return {k: section[k] for k in keys}


def _rope_theta(text: dict[str, Any]) -> float:
    if "rope_theta" in text:
        return float(text["rope_theta"])
    params = text.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    raise ModelError("config.json: text_config lacks rope_theta")


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from the parsed ``config.json`` of a Qwen3-ASR folder."""
    if raw.get("model_type") != "qwen3_asr" or "thinker_config" not in raw:
        found = raw.get("model_type", "none")
        raise ModelError(f"config.json: not a Qwen3-ASR model (model_type {found!r}, expected 'qwen3_asr')")
    thinker = raw["thinker_config"]
    audio_raw = thinker.get("audio_config")
    text_raw = thinker.get("text_config")
    if not isinstance(audio_raw, dict) or not isinstance(text_raw, dict):
        raise ModelError("config.json: thinker_config needs audio_config and text_config")
    audio = AudioEncoderConfig(
        **_require(audio_raw, _AUDIO_KEYS, "audio_config"),
        max_source_positions=int(audio_raw.get("max_source_positions", 1500)),
        activation_function=audio_raw.get("activation_function", "gelu"),
    )
    hidden = int(text_raw.get("hidden_size", 0))
    heads = int(text_raw.get("num_attention_heads", 1))
    text = TextConfig(
        **_require(text_raw, _TEXT_KEYS, "text_config"),
        head_dim=int(text_raw.get("head_dim") or hidden // heads),
        rope_theta=_rope_theta(text_raw),
        tie_word_embeddings=bool(text_raw.get("tie_word_embeddings", raw.get("tie_word_embeddings", True))),
        hidden_act=text_raw.get("hidden_act", "silu"),
    )
    if audio.output_dim != text.hidden_size:
        raise ModelError(
            f"config.json: audio output_dim {audio.output_dim} != text hidden_size {text.hidden_size}"
        )
    for key in ("audio_token_id", "audio_start_token_id", "audio_end_token_id"):
        if key not in thinker:
            raise ModelError(f"config.json: thinker_config lacks {key}")
    return ModelConfig(
        audio=audio,
        text=text,
        audio_token_id=int(thinker["audio_token_id"]),
        audio_start_token_id=int(thinker["audio_start_token_id"]),
        audio_end_token_id=int(thinker["audio_end_token_id"]),
        dtype=str(thinker.get("dtype") or raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
        support_languages=tuple(raw.get("support_languages", ())),
        quantization=raw.get("quantization"),
        raw=raw,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate ``config.json`` in ``model_dir``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json (is this a Qwen3-ASR model folder?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable config.json ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: config.json is not a JSON object")
    return parse_config(raw)


def num_audio_tokens(num_frames: int, chunk_frames: int = 100) -> int:
    """Audio tokens the encoder makes from ``num_frames`` mel frames (official formula)."""
    per_chunk = _conv_out_len(chunk_frames)
    rest = num_frames % chunk_frames
    return (num_frames // chunk_frames) * per_chunk + (_conv_out_len(rest) if rest else 0)


def _conv_out_len(frames: int) -> int:
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def encoder_windows(num_frames: int, audio: AudioEncoderConfig) -> list[int]:
    """Boundaries (cu_seqlens) of the encoder's bidirectional attention windows, in tokens."""
    total = num_audio_tokens(num_frames, audio.chunk_frames)
    longest_chunk = min(num_frames, audio.chunk_frames)
    window = _conv_out_len(longest_chunk) * audio.window_chunks
    bounds = list(range(0, total, window)) + [total]
    return bounds if total else [0]


Run = tuple[int, int, int]  # (first token, number of windows, window width): consecutive equal-width windows


def window_runs(bounds: Sequence[int], offset: int = 0) -> list[Run]:
    """Group attention windows (``encoder_windows`` bounds) into runs of consecutive equal-width windows.

    The encoder's attention then runs once per run on a view of the unpadded tokens, while its linears see
    every token once: no padded last window and no mask (a 10 s clip has 131 tokens, one padded
    two-window layout 208). ``offset`` shifts the runs (several recordings encoded together).
    """
    runs: list[Run] = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        width = end - start
        if runs and runs[-1][2] == width:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, width)
        else:
            runs.append((offset + start, 1, width))
    return runs


def batch_runs(frames: Sequence[int], audio: AudioEncoderConfig, max_tokens: int) -> list[tuple[list[int], list[Run]]]:
    """Recordings of ``frames`` mel frames each, encoded together: groups of consecutive recordings of at
    most ``max_tokens`` audio tokens (a longer recording alone), each with its windows' runs over the
    group's concatenated tokens."""
    groups: list[tuple[list[int], list[Run]]] = []
    used = max_tokens
    for index, count in enumerate(frames):
        tokens = num_audio_tokens(count, audio.chunk_frames)
        if used + tokens > max_tokens:
            groups.append(([], []))
            used = 0
        members, runs = groups[-1]
        members.append(index)
        runs += window_runs(encoder_windows(count, audio), used)
        used += tokens
    return groups
