"""The small interface each tensor backend (MLX, PyTorch) implements.

Everything that is not tensor math (config, audio, tokenizer, prompt, decoding policy, chunking,
parsing) lives outside the backends and is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Step:
    """One generated token and its log-probability under the model."""

    token: int
    logprob: float


class Backend(ABC):
    """Tensor math for one model: log-mel, audio encoder + projector, LLM prefill and decoding.

    Arrays passed between the methods are the backend's own type (``mx.array``/``torch.Tensor``).
    """

    name: str = ""

    def __init__(self, checkpoint: Checkpoint, dtype: str, device: str) -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.dtype = dtype
        self.device = device

    @abstractmethod
    def log_mel(self, samples: np.ndarray) -> Any:
        """Log-mel features ``[n_mels, T]`` (float32) of 16 kHz mono float32 samples."""

    @abstractmethod
    def encode(self, mel: Any) -> Any:
        """Audio embeddings ``[N_a, hidden]``: audio tower (windowed attention) then projector."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: Sequence[int],
        audio_embeds: Any,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
    ) -> Iterator[Step]:
        """Greedy decoding with a KV cache after the prompt.

        The ``<|audio_pad|>`` positions of ``prompt_ids`` take the rows of ``audio_embeds`` in order.
        Yields each chosen token (the stop token included, then ends) until ``max_new_tokens`` tokens
        were yielded. Stop tokens are suppressed until ``min_new_tokens`` were yielded. The first
        token is yielded right after the prefill, so a caller can time prefill and decode apart.
        """

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        audio_embeds: Sequence[Any],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
    ) -> list[list[Step]]:
        """Greedy decoding of several prompts; each result equals :meth:`generate` on its own.

        Backends override this with real batched decoding; this fallback runs them one by one.
        """
        return [
            list(self.generate(p, a, max_new_tokens, stop_ids, min_new_tokens))
            for p, a in zip(prompts, audio_embeds, strict=True)
        ]

    @abstractmethod
    def first_logits(self, prompt_ids: Sequence[int], audio_embeds: Any) -> np.ndarray:
        """Float32 logits ``[vocab]`` of the first generated token (last prompt position)."""

    @abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """Copy a backend array to a float32 (or integer) numpy array."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until queued work is done (for honest stage timings)."""
