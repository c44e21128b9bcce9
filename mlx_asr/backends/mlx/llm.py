"""The Qwen3 decoder in MLX: modules named like the checkpoint, a KV cache, and a compiled decode step.

Design for decoding speed (it is weight-bandwidth bound, one token at a time):

* ``fuse()`` joins ``q/k/v_proj`` into one ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``
  (row concatenation, exact for float and for affine-quantized weights of equal bits/group size):
  four matmuls per layer instead of seven. The q and k heads then share one RMSNorm and one RoPE call.
* Every step uses ``mx.fast`` kernels (``rms_norm``, ``rope``, ``scaled_dot_product_attention``) and,
  for quantized models, ``quantized_matmul`` (``QuantizedLinear`` / ``QuantizedEmbedding.as_linear``).
* The whole decode step (embedding, 28 layers, head, greedy choice, log-probability) is one
  ``mx.compile``\\ d function of fixed shapes: the KV cache is a fixed-capacity buffer written with
  ``mx.slice_update`` at a position held on the device, and attention reads the buffer under a mask,
  so the step is traced once per cache capacity (capacities grow in steps of ``CACHE_STEP``).
  Elementwise work is fused and the graph has far fewer nodes than an eager step.
* The chosen token never leaves the device: the next step reads it from the previous one, and the
  host reads one packed ``[token, logprob]`` pair per step, so a step costs one evaluation.

Two ways to run the steps (``pipelined``): *pipelined* queues step ``n+1`` with ``mx.async_eval`` before
reading step ``n`` (the device never waits for Python, but each cache update copies the cache, because
its buffer is still referenced by the queued step); *synchronous* evaluates one step at a time and the
cache is updated in place. Pipelined is the default on the GPU, synchronous on the CPU, where Python's
graph building is cheap next to a step and copying the cache is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import TextConfig
from ..base import Step

PREFILL_STEP = 2048  # prompt tokens per prefill pass: bounds the attention scores' memory
CACHE_STEP = 256  # KV-cache capacity grows in these steps (one compiled trace per capacity)


@mx.compile
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def fuse_linears(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One linear whose output rows are those of ``parts`` in order; ``None`` if they cannot be joined.

    Float ``Linear``\\ s join their weights; ``QuantizedLinear``\\ s join weights, scales and biases (rows
    are quantized independently, so the joined layer computes exactly the same products).
    """
    if any("bias" in p for p in parts):
        return None
    first = parts[0]
    if all(type(p) is nn.Linear for p in parts):
        out_dims = sum(p.weight.shape[0] for p in parts)
        fused = nn.Linear(first.weight.shape[1], out_dims, bias=False)
        fused.weight = mx.concatenate([p.weight for p in parts])
        return fused
    if all(type(p) is nn.QuantizedLinear for p in parts):
        same = {(p.group_size, p.bits, p.mode, p.get("biases") is None) for p in parts}
        if len(same) != 1:
            return None
        fused = _empty_quantized(first)
        fused.weight = mx.concatenate([p.weight for p in parts])
        fused.scales = mx.concatenate([p.scales for p in parts])
        if first.get("biases") is not None:
            fused.biases = mx.concatenate([p.biases for p in parts])
        return fused
    return None


def _empty_quantized(like: nn.QuantizedLinear) -> nn.QuantizedLinear:
    """A ``QuantizedLinear`` with ``like``'s settings whose arrays the caller sets (no random init)."""
    fused = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
    nn.Module.__init__(fused)
    fused.group_size, fused.bits, fused.mode = like.group_size, like.bits, like.mode
    fused.freeze()
    return fused


class Attention(nn.Module):
    """Qwen3 grouped-query attention with q/k RMSNorm and NeoX RoPE (no biases)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.rope_theta = float(cfg.rope_theta)
        q_dims, kv_dims = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dims, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dims, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dims, bias=False)
        self.o_proj = nn.Linear(q_dims, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)

    def fuse(self) -> None:
        """One ``qkv_proj``; q and k heads then share one RMSNorm (weights applied as a per-head table)
        and one RoPE call, as q and k take the same positions: 3 kernels instead of 4."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            for name in ("q_proj", "k_proj", "v_proj"):
                delattr(self, name)
            d = self.head_dim
            self.qk_norm_weight = mx.concatenate([
                mx.broadcast_to(self.q_norm.weight, (self.n_heads, d)),
                mx.broadcast_to(self.k_norm.weight, (self.n_kv_heads, d)),
            ])

    def _qkv(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Normed, rotated ``q`` ``[B, heads, L, D]`` and ``k``, and ``v`` ``[B, kv_heads, L, D]``."""
        batch, length, _ = x.shape
        if "qkv_proj" in self:
            heads = self.n_heads + self.n_kv_heads
            qk, v = mx.split(self.qkv_proj(x), [heads * self.head_dim], axis=-1)
            qk = qk.reshape(batch, length, heads, self.head_dim)
            qk = mx.fast.rms_norm(qk, None, self.q_norm.eps) * self.qk_norm_weight
            q, k = mx.split(self._rope(qk.transpose(0, 2, 1, 3), offset), [self.n_heads], axis=1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = self._rope(self.q_norm(q.reshape(batch, length, self.n_heads, -1)).transpose(0, 2, 1, 3), offset)
            k = self._rope(self.k_norm(k.reshape(batch, length, self.n_kv_heads, -1)).transpose(0, 2, 1, 3), offset)
        v = v.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return q, k, v

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)

    def _out(self, attn: mx.array) -> mx.array:
        batch, _, length, _ = attn.shape
        return self.o_proj(attn.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    def __call__(self, x: mx.array, mask: Any, cache: LayerCache | None) -> mx.array:
        q, k, v = self._qkv(x, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self._out(mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask))

    def decode(
        self, x: mx.array, pos: mx.array, keys: mx.array, values: mx.array, mask: mx.array
    ) -> tuple[mx.array, mx.array, mx.array]:
        """One token ``x [1, 1, H]`` at device position ``pos``: write its k/v into the full-capacity
        buffers and attend over the buffers under ``mask``; returns the output and the new buffers."""
        q, k, v = self._qkv(x, pos)
        start = pos.reshape(1)
        keys = mx.slice_update(keys, k.astype(keys.dtype), start, (2,))
        values = mx.slice_update(values, v.astype(values.dtype), start, (2,))
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self._out(out), keys, values


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def fuse(self) -> None:
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_swiglu(gate, up))


class DecoderLayer(nn.Module):
    """Pre-RMSNorm Qwen3 decoder layer."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: LayerCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode(
        self, x: mx.array, pos: mx.array, keys: mx.array, values: mx.array, mask: mx.array
    ) -> tuple[mx.array, mx.array, mx.array]:
        attn, keys, values = self.self_attn.decode(self.input_layernorm(x), pos, keys, values, mask)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), keys, values


class TextModel(nn.Module):
    """``thinker.model``: token embedding, decoder layers, final RMSNorm (names as in the checkpoint)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def fuse(self) -> None:
        """Join q/k/v and gate/up projections layer by layer (each layer evaluated, so memory stays flat)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
            mx.eval(layer.parameters())

    def __call__(
        self,
        inputs: mx.array | None = None,
        cache: list[LayerCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        """Final-normed hidden states ``[B, L, H]`` of token ids or embeddings, appended to ``cache``."""
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        mask = "causal" if h.shape[1] > 1 else None
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache is not None else None)
        return self.norm(h)


class LayerCache:
    """One layer's keys and values, ``[1, kv_heads, capacity, head_dim]``, valid up to ``offset``."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, needed: int, like: mx.array) -> None:
        """Grow the buffers (in ``CACHE_STEP`` slots) to hold ``needed`` positions shaped like ``like``."""
        if needed <= self.capacity:
            return
        size = -(-needed // CACHE_STEP) * CACHE_STEP
        batch, heads, _, dim = like.shape
        extra = mx.zeros((batch, heads, size - self.capacity, dim), dtype=like.dtype)
        if self.keys is None:
            self.keys, self.values = extra, mx.zeros_like(extra)
        else:
            self.keys = mx.concatenate([self.keys, extra], axis=2)
            self.values = mx.concatenate([self.values, extra], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``[1, kv_heads, n, D]`` keys/values at ``offset``; return all valid keys and values."""
        n = keys.shape[2]
        self.reserve(self.offset + n, keys)
        self.keys[..., self.offset : self.offset + n, :] = keys
        self.values[..., self.offset : self.offset + n, :] = values
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


def make_cache(model: TextModel) -> list[LayerCache]:
    return [LayerCache() for _ in model.layers]


def merge_embeddings(
    embed_tokens: nn.Module, prompt_ids: Sequence[int], audio_embeds: mx.array, audio_token_id: int
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


def output_head(model: TextModel, lm_head: nn.Module | None = None) -> Callable[[mx.array], mx.array]:
    """Hidden states -> logits: ``lm_head`` if untied, else the embedding table used as a linear."""
    return lm_head if lm_head is not None else model.embed_tokens.as_linear


class Decoder:
    """Prefill and greedy decoding over a text model and its output head.

    Args:
        model: the Qwen3 decoder stack (``thinker.model``).
        head: hidden -> logits: a callable (``embed_tokens.as_linear`` when tied, ``lm_head`` otherwise)
            or a ``[vocab, hidden]`` matrix.
        prefill_step: prompt tokens per prefill pass.
        pipelined: queue step ``n+1`` before reading step ``n`` (see the module docstring); ``None``
            picks pipelined on the GPU and synchronous on the CPU.
    """

    def __init__(
        self,
        model: TextModel,
        head: Callable[[mx.array], mx.array] | mx.array,
        prefill_step: int = PREFILL_STEP,
        pipelined: bool | None = None,
    ) -> None:
        self.model = model
        self.head = head
        self.prefill_step = prefill_step
        self.pipelined = pipelined
        self._step = mx.compile(self._decode_step)
        self._step_suppressed = mx.compile(self._decode_step_suppressed)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def logits(self, hidden: mx.array) -> mx.array:
        """Float32 logits of final hidden states ``[..., hidden]``."""
        head = self.head
        out = hidden @ head.T if isinstance(head, mx.array) else head(hidden)
        return out.astype(mx.float32)

    def layer_outputs(self, embeds: mx.array) -> list[mx.array]:
        """Prefill without cache: each decoder layer's output ``[L, H]``, then the final-normed states."""
        h = embeds[None]
        mask = "causal" if h.shape[1] > 1 else None
        states = []
        for layer in self.model.layers:
            h = layer(h, mask, None)
            states.append(h[0])
        states.append(self.model.norm(h)[0])
        return states

    def prefill(self, embeds: mx.array, cache: list[LayerCache]) -> mx.array:
        """Run the prompt through the cache in steps; return the float32 logits ``[vocab]`` of its last token."""
        start = 0
        while embeds.shape[0] - start > self.prefill_step:
            self.model(cache=cache, input_embeddings=embeds[None, start : start + self.prefill_step])
            mx.eval([(c.keys, c.values) for c in cache])
            start += self.prefill_step
        hidden = self.model(cache=cache, input_embeddings=embeds[None, start:])
        return self.logits(hidden[0, -1])

    def first_logits(self, embeds: mx.array) -> mx.array:
        """Float32 logits ``[vocab]`` after the prompt embeddings ``[L, H]`` (fresh cache)."""
        return self.prefill(embeds, make_cache(self.model))

    # ------------------------------------------------------------------ the compiled step
    def _decode_step(
        self, token: mx.array, pos: mx.array, keys: list[mx.array], values: list[mx.array]
    ) -> tuple[mx.array, mx.array, mx.array, list[mx.array], list[mx.array]]:
        """Token ``[1]`` at position ``pos`` -> (``[token, logprob]`` float32, next token, ``pos + 1``, caches)."""
        return self._decode(token, pos, keys, values, None)

    def _decode_step_suppressed(self, token, pos, keys, values, penalty):
        return self._decode(token, pos, keys, values, penalty)

    def _decode(self, token, pos, keys, values, penalty):
        h = self.model.embed_tokens(token)[None]
        mask = mx.arange(keys[0].shape[2]) <= pos
        new_keys, new_values = [], []
        for layer, k, v in zip(self.model.layers, keys, values, strict=True):
            h, k, v = layer.decode(h, pos, k, v, mask)
            new_keys.append(k)
            new_values.append(v)
        logits = self.logits(self.model.norm(h)[0, 0])
        chosen, packed = _choose(logits, penalty)
        return packed, chosen.reshape(1), pos + 1, new_keys, new_values

    def decode_step(self, token: mx.array, pos: mx.array, keys, values, penalty: mx.array | None = None):
        """The compiled decoding step (see :meth:`_decode_step`); ``penalty`` adds to the logits before argmax."""
        if penalty is None:
            return self._step(token, pos, keys, values)
        return self._step_suppressed(token, pos, keys, values, penalty)

    def _is_pipelined(self) -> bool:
        if self.pipelined is not None:
            return self.pipelined
        return mx.default_device() == mx.gpu

    def generate(
        self,
        embeds: mx.array,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
        cache: list[LayerCache] | None = None,
    ) -> Iterator[Step]:
        """Greedy decoding after the prompt embeddings ``[L, H]`` (see :meth:`Backend.generate`).

        ``cache``: a cache already holding the start of the prompt (``embeds`` is the rest); it is consumed.

        One evaluation per token: reading the compiled step's ``[token, logprob]`` pair evaluates the step
        (synchronous mode), or one ``mx.async_eval`` queues it and the read waits for it (pipelined).
        """
        if max_new_tokens <= 0:
            return
        stops = {int(s) for s in stop_ids}
        suppress = _stop_penalty(self.vocab_size, stops) if min_new_tokens > 0 else None
        cache = make_cache(self.model) if cache is None else cache
        logits = self.prefill(embeds, cache)
        offset = cache[0].offset
        for c in cache:
            c.reserve(offset + 1, c.keys)
        keys, values = [c.keys for c in cache], [c.values for c in cache]
        del cache
        token, packed = _choose(logits, suppress)
        token = token.reshape(1)
        pos = mx.array(offset, dtype=mx.int32)
        pipelined = self._is_pipelined()
        if pipelined:
            mx.async_eval(packed, token, keys, values)
        for n in range(1, max_new_tokens + 1):
            capacity = keys[0].shape[2]
            more = n < max_new_tokens
            if more and offset + n > capacity:
                keys, values = _grow(keys), _grow(values)
            penalty = suppress if n < min_new_tokens else None
            if pipelined:
                if more:
                    following = self.decode_step(token, pos, keys, values, penalty)
                    mx.async_eval(following[0], following[1], following[2], following[3], following[4])
                    keys = values = None
                chosen, logprob = packed.tolist()
            else:
                chosen, logprob = packed.tolist()
            chosen = int(chosen)
            yield Step(chosen, float(logprob))
            if chosen in stops or not more:
                return
            if pipelined:
                packed, token, pos, keys, values = following
                del following
            else:  # evaluated by the next read of ``packed`` (the caches are in its graph): one evaluation
                packed, token, pos, keys, values = self.decode_step(token, pos, keys, values, penalty)


def _grow(buffers: list[mx.array]) -> list[mx.array]:
    """Cache buffers with ``CACHE_STEP`` more (zero) positions."""
    b, h, _, d = buffers[0].shape
    extra = mx.zeros((b, h, CACHE_STEP, d), dtype=buffers[0].dtype)
    return [mx.concatenate([x, extra], axis=2) for x in buffers]


def _stop_penalty(vocab: int, stops: set[int]) -> mx.array | None:
    """Additive ``-inf`` row that forbids the stop ids (``None`` when there are none)."""
    valid = [s for s in stops if 0 <= s < vocab]
    if not valid:
        return None
    penalty = np.zeros(vocab, dtype=np.float32)
    penalty[valid] = -np.inf
    return mx.array(penalty)


def _choose(logits: mx.array, penalty: mx.array | None) -> tuple[mx.array, mx.array]:
    """Greedy token (first index on ties) and ``[token, logprob]`` (float32; the logprob is under the
    unmasked logits). Token ids are below 2**24, so the float32 copy is exact."""
    token = mx.argmax(logits if penalty is None else logits + penalty)
    logprob = logits[token] - mx.logsumexp(logits)
    return token, mx.stack([token.astype(mx.float32), logprob])
