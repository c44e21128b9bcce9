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

    def encode_batch(self, mels: Sequence[Any]) -> list[Any]:
        """:meth:`encode` of several log-mels; backends share the encoder's matrix products between them."""
        return [self.encode(mel) for mel in mels]

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

    def peak_device_mb(self) -> float | None:
        """Peak memory allocated on the accelerator so far, in MB; ``None`` where the device is the CPU."""
        return None

    def cpu_threads(self) -> int | None:
        """CPU threads the latest forward passes ran on; ``None`` where the backend does not choose them."""
        return None

    # ------------------------------------------------------------------ streaming (cached mode)
    def encode_stem(self, mel: Any) -> Any:
        """Conv-stem rows ``[tokens, d_model]`` (per-chunk positions added) of mel frames that start a chunk.

        As inside a recording longer than one chunk: a last partial 100-frame chunk is zero-padded to full
        width (even when it is the only one) and its padding tokens are dropped. With
        :meth:`encode_window`, lets the cached streaming mode keep the stem of finished chunks.
        """
        raise NotImplementedError(f"the {self.name} backend cannot encode part of a recording")

    def encode_window(self, stems: Sequence[Any]) -> Any:
        """Audio embeddings ``[tokens, hidden]`` of conv-stem rows that make up one attention window.

        ``stems``: consecutive pieces of :meth:`encode_stem` output (at most one window's worth, 104 rows),
        attended together by the transformer layers, then ``ln_post`` and the projector. For the rows of a
        window this equals :meth:`encode` of the whole recording.
        """
        raise NotImplementedError(f"the {self.name} backend cannot encode part of a recording")

    def prefill_prefix(self, prompt_ids: Sequence[int], audio_embeds: Any | None, prefix: Any | None = None) -> Any:
        """Run prompt tokens through the decoder into a reusable KV cache and return it.

        ``audio_embeds`` fill the ``<|audio_pad|>`` slots of ``prompt_ids`` (``None`` when there are none).
        With ``prefix`` (a value this method returned) the tokens continue it; it is extended in place and
        returned. Used with :meth:`generate_after` by the cached streaming mode.
        """
        raise NotImplementedError(f"the {self.name} backend cannot keep a prompt's KV cache")

    def generate_after(
        self,
        prefix: Any,
        prompt_ids: Sequence[int],
        audio_embeds: Any | None,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
        draft: Sequence[int] = (),
    ) -> Iterator[Step]:
        """:meth:`generate` for the prompt made of ``prefix``'s tokens followed by ``prompt_ids``.

        ``draft``: tokens the output is expected to start with (streaming: the previous output's rolled-back
        tokens). They are run through the prefill with the prompt; each one that greedy decoding confirms
        needs no decoding step of its own. The tokens are those of ``generate`` on the whole prompt, up to
        float rounding; ``prefix`` is left holding only its own tokens, so it can be reused (one generation
        at a time).
        """
        raise NotImplementedError(f"the {self.name} backend cannot keep a prompt's KV cache")
