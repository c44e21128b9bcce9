"""The Qwen3 decoder: mlx-lm's ``Qwen3Model`` built from our config, embedding merge, greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.models.qwen3 import ModelArgs, Qwen3Model

from ...config import TextConfig
from ..base import Step

PREFILL_STEP = 2048  # prompt tokens per prefill pass: bounds the attention scores' memory


def model_args(text: TextConfig) -> ModelArgs:
    """mlx-lm ``ModelArgs`` for our text config.

    ``rope_scaling`` is left out on purpose: Qwen3-ASR's interleaved MRoPE gets three equal position
    rows, so it is plain NeoX RoPE with ``rope_theta`` (spec §5.3).
    """
    return ModelArgs(
        model_type="qwen3",
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers,
        intermediate_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        rms_norm_eps=text.rms_norm_eps,
        vocab_size=text.vocab_size,
        num_key_value_heads=text.num_key_value_heads,
        max_position_embeddings=text.max_position_embeddings,
        head_dim=text.head_dim,
        tie_word_embeddings=text.tie_word_embeddings,
        rope_theta=text.rope_theta,
        rope_scaling=None,
    )


def merge_embeddings(
    embed_tokens: nn.Embedding, prompt_ids: Sequence[int], audio_embeds: mx.array, audio_token_id: int
) -> mx.array:
    """Prompt embeddings ``[L, H]`` whose ``<|audio_pad|>`` rows are the audio embeddings, in order."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    slots = np.flatnonzero(ids == audio_token_id)
    if len(slots) != audio_embeds.shape[0]:
        raise ValueError(
            f"prompt has {len(slots)} audio placeholder tokens but the audio gives {audio_embeds.shape[0]}"
        )
    text = embed_tokens(mx.array(ids.astype(np.int32)))
    if len(slots) == 0:
        return text
    source = np.arange(len(ids))
    source[slots] = len(ids) + np.arange(len(slots))
    merged = mx.concatenate([text, audio_embeds.astype(text.dtype)])
    return merged[mx.array(source.astype(np.int32))]


class Decoder:
    """Prefill and greedy decoding over a text model and its output matrix.

    Args:
        model: the Qwen3 decoder stack (``thinker.model``).
        head: the output projection, ``[vocab, hidden]`` (``embed_tokens`` when tied).
    """

    def __init__(self, model: Qwen3Model, head: mx.array, prefill_step: int = PREFILL_STEP) -> None:
        self.model = model
        self.head = head
        self.prefill_step = prefill_step

    def logits(self, hidden: mx.array) -> mx.array:
        """Float32 logits of final hidden states ``[..., hidden]``."""
        return (hidden @ self.head.T).astype(mx.float32)

    def layer_outputs(self, embeds: mx.array) -> list[mx.array]:
        """Prefill without cache: each decoder layer's output ``[L, H]``, then the final-normed states."""
        h = embeds[None]
        mask = create_attention_mask(h, None)
        states = []
        for layer in self.model.layers:
            h = layer(h, mask, None)
            states.append(h[0])
        states.append(self.model.norm(h)[0])
        return states

    def prefill(self, embeds: mx.array, cache: list[KVCache]) -> mx.array:
        """Run the prompt through the cache in steps; return the float32 logits ``[vocab]`` of its last token."""
        start = 0
        while embeds.shape[0] - start > self.prefill_step:
            self.model(None, cache=cache, input_embeddings=embeds[None, start : start + self.prefill_step])
            mx.eval([c.state for c in cache])
            start += self.prefill_step
        hidden = self.model(None, cache=cache, input_embeddings=embeds[None, start:])
        return self.logits(hidden[0, -1])

    def first_logits(self, embeds: mx.array) -> mx.array:
        """Float32 logits ``[vocab]`` after the prompt embeddings ``[L, H]`` (fresh cache)."""
        return self.prefill(embeds, make_prompt_cache(self.model))

    def step(self, token: mx.array, cache: list[KVCache]) -> mx.array:
        """One decoding step from a device token id; returns the float32 logits ``[vocab]``."""
        hidden = self.model(token.reshape(1, 1), cache=cache)
        return self.logits(hidden[0, -1])

    def generate(
        self, embeds: mx.array, max_new_tokens: int, stop_ids: Sequence[int], min_new_tokens: int = 0
    ) -> Iterator[Step]:
        """Greedy decoding after the prompt embeddings ``[L, H]`` (see :meth:`Backend.generate`).

        Pipelined like mlx-lm: the graph of step ``n + 1`` is built and queued before step ``n``'s
        token is read back, so the device never waits on Python.
        """
        if max_new_tokens <= 0:
            return
        stops = {int(s) for s in stop_ids}
        suppress = _stop_penalty(self.head.shape[0], stops) if min_new_tokens > 0 else None
        cache = make_prompt_cache(self.model)
        token, logprob = _choose(self.prefill(embeds, cache), suppress)
        mx.async_eval(token, logprob)
        for n in range(1, max_new_tokens + 1):
            if n < max_new_tokens:
                following = _choose(self.step(token, cache), suppress if n < min_new_tokens else None)
                mx.async_eval(*following)
            chosen = int(token.item())
            yield Step(chosen, float(logprob.item()))
            if chosen in stops or n == max_new_tokens:
                return
            token, logprob = following


def _stop_penalty(vocab: int, stops: set[int]) -> mx.array | None:
    """Additive ``-inf`` row that forbids the stop ids (``None`` when there are none)."""
    valid = [s for s in stops if 0 <= s < vocab]
    if not valid:
        return None
    penalty = np.zeros(vocab, dtype=np.float32)
    penalty[valid] = -np.inf
    return mx.array(penalty)


def _choose(logits: mx.array, penalty: mx.array | None) -> tuple[mx.array, mx.array]:
    """Greedy token (first index on ties) and its log-probability under the unmasked logits."""
    token = mx.argmax(logits if penalty is None else logits + penalty)
    logprob = logits[token] - mx.logsumexp(logits)
    return token, logprob
