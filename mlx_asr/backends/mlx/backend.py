"""``MlxBackend``: the :class:`~mlx_asr.backends.base.Backend` on MLX (Metal GPU or CPU)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ...checkpoint import Checkpoint
from ...errors import BackendError
from ..base import DTYPES, Backend, Step
from .features import log_mel
from .llm import Decoder, merge_embeddings
from .model import load_model

DEVICES = {"cpu": "cpu", "gpu": "gpu", "metal": "gpu"}


def select_device(device: str) -> None:
    """Make ``device`` (``cpu``, ``gpu`` or ``metal``) MLX's default device."""
    kind = DEVICES.get(device)
    if kind is None:
        raise BackendError(f"unknown MLX device {device!r} (use cpu, gpu or metal)")
    if kind == "gpu" and not mx.metal.is_available():
        raise BackendError("Metal GPU is not available on this machine; use --device cpu")
    mx.set_default_device(mx.gpu if kind == "gpu" else mx.cpu)


def _queued(x: mx.array) -> mx.array:
    """Start computing ``x`` now (MLX is lazy), so :meth:`MlxBackend.synchronize` times the stage."""
    mx.async_eval(x)
    return x


class MlxBackend(Backend):
    """Qwen3-ASR on MLX: log-mel, windowed audio encoder + projector, Qwen3 prefill and greedy decoding.

    Args:
        checkpoint: an opened Qwen3-ASR folder.
        dtype: compute dtype, one of ``float32``, ``bfloat16``, ``float16``.
        device: ``cpu``, or ``gpu``/``metal`` for the Apple GPU.
        options: other backends' options (``quantize``, ``threads``); none is supported here, so any
            given raises :class:`BackendError`.
    """

    name = "mlx"

    def __init__(self, checkpoint: Checkpoint, dtype: str, device: str, **options: Any) -> None:
        super().__init__(checkpoint, dtype, device)
        if options:
            raise BackendError(f"the mlx backend does not support the option(s) {', '.join(sorted(options))}")
        if dtype not in DTYPES:
            raise BackendError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
        select_device(device)
        self.model = load_model(checkpoint, dtype)
        thinker = self.model.thinker
        self.audio_tower = thinker.audio_tower
        self.decoder = Decoder(thinker.model, thinker.output_matrix)

    def log_mel(self, samples: np.ndarray) -> mx.array:
        return _queued(log_mel(samples, self.config.audio.num_mel_bins))

    def encode(self, mel: Any) -> mx.array:
        return _queued(self.audio_tower(mx.array(mel) if isinstance(mel, np.ndarray) else mel))

    def embed_prompt(self, prompt_ids: Sequence[int], audio_embeds: mx.array) -> mx.array:
        """Prompt embeddings ``[L, hidden]`` with the audio rows in the ``<|audio_pad|>`` slots."""
        embed_tokens = self.decoder.model.embed_tokens
        return merge_embeddings(embed_tokens, prompt_ids, audio_embeds, self.config.audio_token_id)

    def generate(
        self,
        prompt_ids: Sequence[int],
        audio_embeds: Any,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
    ) -> Iterator[Step]:
        embeds = self.embed_prompt(prompt_ids, audio_embeds)
        return self.decoder.generate(embeds, max_new_tokens, stop_ids, min_new_tokens)

    def first_logits(self, prompt_ids: Sequence[int], audio_embeds: Any) -> np.ndarray:
        return self.to_numpy(self.decoder.first_logits(self.embed_prompt(prompt_ids, audio_embeds)))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(x.astype(mx.float32) if x.dtype in (mx.bfloat16, mx.float16) else x)

    def synchronize(self) -> None:
        mx.synchronize()
