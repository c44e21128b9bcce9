"""``MlxBackend``: the :class:`~mlx_asr.backends.base.Backend` on MLX (Metal GPU or CPU)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ...checkpoint import Checkpoint
from ...config import num_audio_tokens
from ...errors import BackendError, ModelError
from ...quantize import QuantPolicy
from ..base import DTYPES, Backend, Step
from .features import log_mel
from .llm import Decoder, LayerCache, make_cache, merge_embeddings
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


def _policy(quantize: int | str | QuantPolicy | None) -> QuantPolicy | None:
    """The quantization policy for the ``quantize`` option (``None``: keep the checkpoint's weights)."""
    if quantize is None or isinstance(quantize, QuantPolicy):
        return quantize
    if quantize == "w8a8":
        raise BackendError("w8a8 (int8 activations) is a mode of the torch CPU backend; MLX quantizes weights: 8 or 4")
    try:
        return QuantPolicy.create(quantize)
    except ModelError as exc:
        raise BackendError(f"quantize: {exc}") from None


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
        quantize: quantize a float checkpoint while loading: ``4`` or ``8`` (LLM linear bits, with the
            converter's default policy for the rest) or a :class:`~mlx_asr.quantize.QuantPolicy`;
            a folder made by ``mlx-asr convert`` loads faster and with less memory.
        options: other backends' options (``threads``); none is supported here, so any given raises
            :class:`BackendError`.
    """

    name = "mlx"

    def __init__(
        self,
        checkpoint: Checkpoint,
        dtype: str,
        device: str,
        quantize: int | str | QuantPolicy | None = None,
        **options: Any,
    ) -> None:
        super().__init__(checkpoint, dtype, device)
        if options:
            raise BackendError(f"the mlx backend does not support the option(s) {', '.join(sorted(options))}")
        if dtype not in DTYPES:
            raise BackendError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
        policy = _policy(quantize)
        select_device(device)
        self.model = load_model(checkpoint, dtype, policy)
        thinker = self.model.thinker
        self.audio_tower = thinker.audio_tower
        self.decoder = Decoder(thinker.model, thinker.output_head)

    def log_mel(self, samples: np.ndarray) -> mx.array:
        return _queued(log_mel(samples, self.config.audio.num_mel_bins))

    def encode(self, mel: Any) -> mx.array:
        return _queued(self.audio_tower(mx.array(mel) if isinstance(mel, np.ndarray) else mel))

    def encode_batch(self, mels: Sequence[Any]) -> list[mx.array]:
        arrays = [mx.array(m) if isinstance(m, np.ndarray) else m for m in mels]
        embeds = self.audio_tower.encode_batch(arrays)
        mx.async_eval(*embeds)
        return embeds

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

    # ------------------------------------------------------------------ streaming (cached mode)
    def encode_stem(self, mel: Any) -> mx.array:
        mel = mx.array(mel) if isinstance(mel, np.ndarray) else mel
        size, frames = self.config.audio.chunk_frames, mel.shape[1]
        padded = mx.pad(mel, [(0, 0), (0, -frames % size)])  # a partial chunk convolved at full width
        return _queued(self.audio_tower.stem(padded)[: num_audio_tokens(frames, size)])

    def encode_window(self, stems: Sequence[Any]) -> mx.array:
        return _queued(self.audio_tower.encode_window(list(stems)))

    def _embeds(self, prompt_ids: Sequence[int], audio_embeds: Any | None) -> mx.array:
        if audio_embeds is not None:
            return self.embed_prompt(prompt_ids, audio_embeds)
        if self.config.audio_token_id in prompt_ids:
            raise ValueError("prompt has audio placeholder tokens but no audio embeddings were given")
        return self.decoder.model.embed_tokens(mx.array(np.asarray(prompt_ids, dtype=np.int32)))

    def prefill_prefix(self, prompt_ids: Sequence[int], audio_embeds: Any | None, prefix: Any | None = None) -> Any:
        if prefix is None:
            prefix = make_cache(self.decoder.model)
        self.decoder.prefill(self._embeds(prompt_ids, audio_embeds), prefix)
        mx.eval([(c.keys, c.values) for c in prefix])
        return prefix

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
        fork = []
        for layer in prefix:  # views of the valid part: the first write grows (copies) them
            part = LayerCache()
            part.keys, part.values = layer.keys[..., : layer.offset, :], layer.values[..., : layer.offset, :]
            part.offset = layer.offset
            fork.append(part)
        embeds = self._embeds(prompt_ids, audio_embeds)
        draft = list(draft)[: max(0, max_new_tokens - 1)]
        if not draft or min_new_tokens > 0:
            return self.decoder.generate(embeds, max_new_tokens, stop_ids, min_new_tokens, cache=fork)
        return self._generate_drafted(fork, embeds, draft, max_new_tokens, stop_ids)

    def _generate_drafted(
        self, cache: list, embeds: mx.array, draft: list[int], max_new_tokens: int, stop_ids: Sequence[int]
    ) -> Iterator[Step]:
        """Prefill the prompt and ``draft`` together, take the draft tokens greedy decoding confirms, then decode."""
        table = self.decoder.model.embed_tokens
        joined = mx.concatenate([embeds, table(mx.array(np.asarray(draft, dtype=np.int32))).astype(embeds.dtype)])
        hidden = self.decoder.model(cache=cache, input_embeddings=joined[None])
        logits = self.decoder.logits(hidden[0, -(len(draft) + 1) :])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.argmax(logits, axis=-1)
        picked = mx.take_along_axis(logprobs, chosen[:, None], axis=-1)[:, 0]
        tokens, values = chosen.tolist(), picked.tolist()
        start, stops = cache[0].offset - len(draft), {int(s) for s in stop_ids}
        for i, (token, logprob) in enumerate(zip(tokens, values, strict=True)):
            yield Step(int(token), float(logprob))
            if token in stops or i + 1 == max_new_tokens:
                return
            if i == len(draft) or token != draft[i]:
                break
        for layer in cache:  # keys of the confirmed draft tokens only
            layer.offset = start + i
        follow = table(mx.array([token], dtype=mx.int32))
        yield from self.decoder.generate(follow, max_new_tokens - i - 1, stop_ids, cache=cache)
