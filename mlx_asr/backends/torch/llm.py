"""The Qwen3 decoder (``thinker.model``): preallocated KV cache, prefill and greedy (batched) decoding."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import TextConfig
from ..base import Step
from .compute import float32_copy, limited_threads, one_row_products, upcast_wide
from .cores import FreeCores

Head = Callable[[torch.Tensor], torch.Tensor]
BATCH_PREFILL_TOKENS = 4096  # at most this many (padded) prompt tokens prefilled in one forward pass
GRAPH_CACHES = 3  # CUDA graphs kept per decoder; each pins its KV cache (one transcript, one batch, one stream)
GRAPH_ROOM = 256  # CUDA graphs: pooled caches have a multiple of this many positions
TRACE_AFTER = 64  # CPU: one-row decoding steps run eagerly before the step is recorded (see Decoder)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm over the last axis: normalise in float32, cast back to ``x``'s dtype, scale by ``weight``."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm (:func:`rms_norm`) with its learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """``nn.Linear`` without the random init (every weight is assigned from the checkpoint).

    Many-row products of a half-precision weight run in float32 on CPUs without native half GEMM
    (:mod:`.compute`).
    """

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not upcast_wide(self.weight, x.numel() // x.shape[-1]):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), float32_copy(self.weight), bias).to(x.dtype)


def fused_linear(weights: Sequence[torch.Tensor]) -> nn.Module:
    """One bias-free linear whose output is the concatenation of the outputs of ``weights`` ``[out_i, in]``."""
    weight = torch.cat(list(weights))
    layer = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


Builder = Callable[[Sequence[torch.Tensor]], nn.Module]


class KVCache:
    """Preallocated keys and values ``[layers, batch, kv_heads, capacity, head_dim]``; ``length`` are filled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.length = 0

    @classmethod
    def allocate(
        cls, cfg: TextConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device, zeroed: bool = False
    ) -> KVCache:
        """Uninitialised unless ``zeroed``: fixed-shape steps (:class:`_StepGraph`) read every slot, and a masked
        slot must still hold a finite number (a NaN there would spread through the attention's sums)."""
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        make = torch.zeros if zeroed else torch.empty
        return cls(make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` ``[batch, kv_heads, S, head_dim]``; return the filled keys and values."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def row(self, index: int, offset: int) -> KVCache:
        """A batch-1 cache that writes into row ``index`` of this one from position ``offset`` on (a view)."""
        return KVCache(self.keys[:, index : index + 1, :, offset:], self.values[:, index : index + 1, :, offset:])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (in that order)."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)


class _SlotCache(KVCache):
    """A cache written at the slot held by a tensor and read whole, or its first ``span`` positions (decoding
    steps recorded once and replayed: CUDA graphs read whole buffers, traced CPU steps a span)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, span: int | None = None) -> None:
        super().__init__(keys, values)
        self.slot = slot
        self.span = span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        if self.span is None:
            return self.keys[layer], self.values[layer]
        return self.keys[layer].narrow(2, 0, self.span), self.values[layer].narrow(2, 0, self.span)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """NeoX RoPE of ``x [B, heads, S, D]`` with ``cos``/``sin`` ``[B, 1, S, D]``."""
    cos, sin = rope
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Qwen3 GQA attention: q/k RMSNorm per head before NeoX RoPE, no biases."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.sizes = [q_dim + kv_dim, kv_dim]  # the fused output: q and k heads, then v
        self.q_proj = Linear(cfg.hidden_size, q_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.fused = False

    def fuse(self, build: Builder = fused_linear) -> None:
        """Replace ``q_proj``/``k_proj``/``v_proj`` by one ``qkv_proj`` made by ``build`` (one matmul per step).

        q and k heads then also share one RMSNorm (their weights as a per-head table) and one RoPE, as they
        take the same positions: about 15 fewer small kernels per layer and step (≈50 profiler-level ops).
        """
        self.qkv_proj = build([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        del self.q_proj, self.k_proj, self.v_proj
        d = self.head_dim
        weights = (self.q_norm.weight.expand(self.heads, d), self.k_norm.weight.expand(self.kv_heads, d))
        self.register_buffer("qk_norm_weight", torch.cat(weights), persistent=False)
        self.fused = True

    def _qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Normed, rotated ``q`` ``[B, heads, S, D]`` and ``k``, and ``v`` ``[B, kv_heads, S, D]``."""
        b, s, _ = x.shape
        if self.fused:
            qk, v = self.qkv_proj(x).split(self.sizes, dim=-1)
            qk = rms_norm(qk.reshape(b, s, -1, self.head_dim), self.qk_norm_weight, self.q_norm.eps)
            q, k = _rotate(qk.transpose(1, 2), rope).split([self.heads, self.kv_heads], 1)
        else:
            q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
            k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)
            q, k, v = _rotate(q, rope), _rotate(k, rope), self.v_proj(x)
        return q, k, v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)
        keys, values = cache.update(layer, k, v)
        return self.o_proj(self._attend(q, keys, values, mask))

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, _, s, d = q.shape
        if s == 1:  # decode: fold each kv head's query heads into its "query positions" (no GQA expansion)
            group = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, d)
            out = F.scaled_dot_product_attention(group, keys, values, attn_mask=mask)
            return out.reshape(b, 1, self.heads * d)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, self.heads * d)


class MLP(nn.Module):
    """SiLU-gated feed-forward."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False

    def fuse(self, build: Builder = fused_linear) -> None:
        """Replace ``gate_proj``/``up_proj`` by one ``gate_up_proj`` made by ``build``."""
        self.gate_up_proj = build([self.gate_proj.weight, self.up_proj.weight])
        del self.gate_proj, self.up_proj
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-RMSNorm Qwen3 decoder layer."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """``thinker.model``: token embedding, decoder layers and the final norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # ``_weight`` skips the random init (normal_ on the meta device would import torch._dynamo: ~1 s)
        table = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def fuse(self, build: Builder = fused_linear) -> None:
        """Fuse the q/k/v and gate/up projections of every layer (after loading; copies those weights)."""
        for layer in self.layers:
            layer.self_attn.fuse(build)
            layer.mlp.fuse(build)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """NeoX RoPE ``cos``/``sin`` ``[batch, 1, S, head_dim]`` of positions ``[batch, S]`` (float32, then cast)."""
        dim = self.cfg.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        inv_freq = 1.0 / (self.cfg.rope_theta**exponents)
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | None = None,
        states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[batch, S, H]`` after the final norm; appends ``S`` tokens to ``cache``.

        ``mask`` (True = may attend) is ``None`` for causal attention over an unpadded cache; a call with
        several tokens (a prefill) must start on an empty cache. ``states``, if given, receives every
        layer's output.
        """
        rope = self.rope(positions, x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, cache, index, mask)
            if states is not None:
                states.append(x)
        cache.length += x.shape[1]
        return self.norm(x)


class Decoder:
    """Prefill and greedy decoding over ``thinker.model`` and an output head.

    Args:
        model: the decoder stack.
        head: maps final hidden states ``[..., H]`` to logits ``[..., vocab]``.
        prefill_tokens: at most this many (padded) prompt tokens of a batch are prefilled in one forward
            pass; 0 prefills each prompt on its own. Batching pays where every product has a per-call
            cost on the weight side (bf16 weights upcast on CPUs without native bf16, int8 weights
            dequantized), not where the kernel's cost is per row (w8a8, int4; see :mod:`.quant`).
        row_threads: CPU threads for the decoder layers in a one-row decoding step (the output head keeps
            them all); ``None`` keeps them all. Each of the ~140 parallel kernels of a step wakes the
            pool's sleeping workers (see :mod:`.openmp`), which can cost more than a second thread saves.
        cores: caps the CPU threads of every forward pass at the cores other processes leave free (see
            :mod:`.cores`); ``None`` keeps PyTorch's count.
        trace_after: on the CPU, after this many one-row decoding steps (over all transcripts of this
            decoder) the step is recorded once with ``torch.jit.trace`` and replayed from then on
            (:class:`_TracedStep`); ``None`` never records. Default: ``MLX_ASR_TRACE_AFTER`` or
            :data:`TRACE_AFTER` (``off`` in the variable: never).

    On CUDA, decoding steps replay a captured CUDA graph (:class:`_StepGraph`) instead of launching their few
    hundred small kernels one by one from Python; ``MLX_ASR_CUDA_GRAPHS=0`` turns that off. Measured on an H200
    (0.6B, bf16, 10 s clip, 40 tokens): 13.4 -> 3.0 ms/token. Prompts then decode into a pooled cache per
    batch size, so that the next transcript replays the same graph, and finished rows of a batch stay in it
    (their tokens are dropped) instead of leaving the cache.
    """

    def __init__(
        self,
        model: TextModel,
        head: Head,
        prefill_tokens: int = BATCH_PREFILL_TOKENS,
        row_threads: int | None = None,
        cores: FreeCores | None = None,
        trace_after: int | None | str = "env",
    ) -> None:
        self.model = model
        self.head = head
        self.prefill_tokens = prefill_tokens
        self.row_threads = row_threads
        self.cores = cores
        self.trace_after = _trace_after() if trace_after == "env" else trace_after
        self._traced: torch.jit.ScriptModule | None = None
        self._eager_rows = 0  # one-row CPU steps run eagerly so far
        self.cfg = model.cfg
        weight = model.norm.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.graphs = self.device.type == "cuda" and os.environ.get("MLX_ASR_CUDA_GRAPHS", "1") != "0"
        self._graphs: OrderedDict[tuple[int, tuple[int, ...]], _StepGraph] = OrderedDict()
        self._free: dict[int, KVCache] = {}  # pooled caches by batch size (CUDA graphs), when no decoding holds them

    def on_free_cores(self) -> contextlib.AbstractContextManager[None]:
        """At most as many PyTorch threads inside as there are free CPU cores now (see ``cores``)."""
        return limited_threads(self.cores.threads() if self.cores else None, self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states."""
        return self.head(hidden).float()

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` rows of ``capacity`` positions (zeroed for CUDA-graph steps)."""
        return KVCache.allocate(self.cfg, batch, capacity, self.dtype, self.device, zeroed=self.graphs)

    @torch.inference_mode()
    def layer_outputs(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Prefill of ``[L, H]``: each decoder layer's output ``[L, H]``, then the final-normed states."""
        states: list[torch.Tensor] = []
        positions = torch.arange(embeds.shape[0], device=self.device)[None]
        final = self.model(embeds[None].to(self.dtype), positions, self.new_cache(1, embeds.shape[0]), states=states)
        return [s[0] for s in states] + [final[0]]

    def _prefill(self, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        positions = torch.arange(embeds.shape[0], device=self.device)[None]
        hidden = self.model(embeds[None].to(self.dtype), positions, cache)
        return self.logits(hidden[0, -1])

    @torch.inference_mode()
    def first_logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[vocab]`` after the prompt embeddings ``[L, H]``."""
        with self.on_free_cores():
            return self._prefill(embeds, self.new_cache(1, embeds.shape[0]))

    @torch.inference_mode()
    def _start(self, prompts: Sequence[torch.Tensor], max_new_tokens: int) -> tuple[_Batch, torch.Tensor]:
        """Prefill every prompt into its left-padded row of one batch cache; first logits ``[B, vocab]``.

        Several prompts go through one forward pass when they fit ``prefill_tokens`` (bigger matmuls,
        and int8 weights are dequantized once for all rows instead of once per prompt).
        """
        lengths = [p.shape[0] for p in prompts]
        longest = max(lengths)
        if self.graphs:
            cache = self._take(len(prompts), longest + max_new_tokens)
        else:
            cache = self.new_cache(len(prompts), longest + max_new_tokens)
        batch = _Batch(cache, lengths, self.device, fixed=self.graphs)
        with self.on_free_cores():
            return batch, self._prefill_rows(prompts, cache)

    def _prefill_rows(self, prompts: Sequence[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """Prefill of the prompts into their left-padded rows of an empty batch cache; logits ``[B, vocab]``."""
        longest = max(p.shape[0] for p in prompts)
        if 1 < len(prompts) and len(prompts) * longest <= self.prefill_tokens:
            return self._prefill_together(prompts, cache)
        logits = []
        for row, embeds in enumerate(prompts):
            pad = longest - embeds.shape[0]
            if pad:
                cache.keys[:, row, :, :pad] = 0
                cache.values[:, row, :, :pad] = 0
            logits.append(self._prefill(embeds, cache.row(row, pad)))
        cache.length = longest
        return torch.stack(logits)

    def _prefill_together(self, prompts: Sequence[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """One forward of the left-padded prompts into an empty batch cache; last-position logits ``[B, vocab]``.

        Each row's real tokens get positions from 0 and attend causally to that row's real tokens only, as
        in a prefill of their own; padding positions attend to themselves (finite, and masked later).
        """
        longest = max(p.shape[0] for p in prompts)
        pads = [longest - p.shape[0] for p in prompts]
        embeds = torch.stack([F.pad(p.to(self.dtype), (0, 0, pad, 0)) for p, pad in zip(prompts, pads, strict=True)])
        index = torch.arange(longest, device=self.device)
        first = torch.tensor(pads, device=self.device)[:, None]
        positions = (index[None, :] - first).clamp(min=0)
        mask = None
        if any(pads):
            real = index[None, :] >= first  # [B, L]: key is a real token
            causal = index[None, :] <= index[:, None]  # [L, L]
            mask = (causal[None] & (real[:, None, :] | torch.eye(longest, dtype=torch.bool, device=self.device)))[
                :, None
            ]
        hidden = self.model(embeds, positions, cache, mask)
        return self.logits(hidden[:, -1])

    def _take(self, batch: int, capacity: int) -> KVCache:
        """The pooled cache of ``batch`` rows (emptied) if it has room for ``capacity`` positions, else a new one."""
        cache = self._free.pop(batch, None)
        if cache is None or cache.keys.shape[3] < capacity:
            cache = self.new_cache(batch, -(-capacity // GRAPH_ROOM) * GRAPH_ROOM)
        cache.length = 0
        return cache

    @torch.inference_mode()
    def _graph_step(self, batch: _Batch, tokens: list[int]) -> torch.Tensor:
        """A step of every row, replayed from the CUDA graph of ``batch``'s cache (captured on its first step);
        ``tokens`` are the live rows' and so are the logits returned."""
        cache = batch.cache
        for row, token in zip(batch.live, tokens, strict=True):
            batch.tokens[row] = token
        key = (cache.keys.data_ptr(), tuple(cache.keys.shape))
        graph = self._graphs.pop(key, None)
        if graph is None:
            while len(self._graphs) >= GRAPH_CACHES:  # the oldest graph goes, and its pooled cache with it
                (pointer, _), _ = self._graphs.popitem(last=False)
                self._free = {n: c for n, c in self._free.items() if c.keys.data_ptr() != pointer}
            graph = _StepGraph(self, batch)
        self._graphs[key] = graph
        logits = graph(batch)
        cache.length += 1
        batch.positions += 1
        return logits if len(batch.live) == len(batch.tokens) else logits[batch.live]

    @torch.inference_mode()
    def _step(self, batch: _Batch, tokens: list[int]) -> torch.Tensor:
        """One decoding step of every active row; float32 logits ``[B, vocab]``."""
        if batch.fixed:
            return self._graph_step(batch, tokens)
        mask = batch.mask()
        one_row = len(tokens) == 1
        if one_row and mask is None and self._recorded():
            return self._replay(batch, tokens[0])
        ids = torch.tensor(tokens, device=self.device)[:, None]
        with one_row_products(self.device) if one_row else contextlib.nullcontext(), self.on_free_cores():
            with limited_threads(self.row_threads if one_row else None, self.device):
                hidden = self.model(self.model.embed_tokens(ids), batch.positions[:, None], batch.cache, mask)
            logits = self.logits(hidden[:, -1])
        batch.positions += 1
        return logits

    def _recorded(self) -> bool:
        """Whether this one-row step replays the recorded step (CPU, all threads, ``trace_after`` steps done)."""
        if self.trace_after is None or self.device.type != "cpu" or self.row_threads is not None:
            return False
        self._eager_rows += 1
        return self._eager_rows > self.trace_after

    def _replay(self, batch: _Batch, token: int) -> torch.Tensor:
        """A one-row step through the recorded step (recorded now if not yet; eager where recording fails)."""
        cache = batch.cache
        inputs = (
            torch.tensor([[token]]),
            batch.positions[:, None],
            torch.tensor([cache.length]),
            torch.empty(cache.length + 1, dtype=torch.int8),  # its length: the positions to attend to
            cache.keys,
            cache.values,
        )
        with one_row_products(self.device), self.on_free_cores(), torch.jit.optimized_execution(False):
            if self._traced is None:
                self._traced = _TracedStep.record(self.model, self.head, inputs)
                if self._traced is None:
                    self.trace_after = None
                    return self._step(batch, [token])
            logits = self._traced(*inputs)
        cache.length += 1
        batch.positions += 1
        return logits

    def decode(
        self, prompts: Sequence[torch.Tensor], max_new_tokens: int, stop_ids: Sequence[int], min_new_tokens: int = 0
    ) -> Iterator[list[tuple[int, Step]]]:
        """Greedy decoding of prompt embeddings ``[L_i, H]`` together.

        Yields, per step, ``(prompt index, Step)`` for every row still running; a row stops after its
        stop token (suppressed before ``min_new_tokens``) or after ``max_new_tokens`` tokens.
        """
        if max_new_tokens <= 0 or not prompts:
            return
        stops = sorted({int(s) for s in stop_ids if 0 <= int(s) < self.cfg.vocab_size})
        batch, logits = self._start(prompts, max_new_tokens)
        try:
            yield from self._greedy(batch, logits, len(prompts), max_new_tokens, stops, min_new_tokens)
        finally:
            if batch.fixed and self.graphs:
                self._free[len(prompts)] = batch.cache  # back to the pool
            elif not self.graphs:  # graphs turned off meanwhile: nothing kept for them
                self._graphs.clear()
                self._free.clear()

    def _greedy(
        self, batch: _Batch, logits: torch.Tensor, count: int, max_new_tokens: int, stops: list[int], min_new: int
    ) -> Iterator[list[tuple[int, Step]]]:
        rows = list(range(count))
        for n in range(max_new_tokens):
            steps = _choose(logits, stops if n < min_new else [])
            yield list(zip(rows, steps, strict=True))
            keep = [i for i, step in enumerate(steps) if step.token not in stops]
            if n + 1 == max_new_tokens or not keep:
                return
            if len(keep) < len(rows):
                batch.select(keep)
                rows = [rows[i] for i in keep]
            logits = self._step(batch, [steps[i].token for i in keep])

    # ------------------------------------------------------------------ reusable prompt prefixes (streaming)
    @torch.inference_mode()
    def extend(self, cache: KVCache, embeds: torch.Tensor, last: int = 1) -> torch.Tensor | None:
        """Append prompt embeddings ``[S, H]`` to a batch-1 cache holding ``cache.length`` positions.

        Positions and the causal mask continue from ``cache.length``; returns the float32 logits
        ``[last, vocab]`` of the last ``last`` positions (``None`` for 0).
        """
        start, count = cache.length, embeds.shape[0]
        positions = torch.arange(start, start + count, device=self.device)[None]
        mask = None
        if start and count > 1:  # causal over the cached keys plus the new ones
            mask = torch.ones(count, start + count, dtype=torch.bool, device=self.device).tril(start)[None, None]
        with self.on_free_cores():
            hidden = self.model(embeds[None].to(self.dtype), positions, cache, mask)
            return self.logits(hidden[0, -last:]) if last else None

    def decode_after(
        self,
        cache: KVCache,
        embeds: torch.Tensor,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
        draft: Sequence[int] = (),
    ) -> Iterator[Step]:
        """Greedy decoding of the prompt ``cache``'s positions + ``embeds [S, H]``; ``cache.length`` is kept.

        ``draft``: tokens expected to come first; they go through the prefill with the prompt, and each one
        the greedy choice confirms is taken without a decoding step. Writes past ``cache.length`` (scratch),
        so the buffer needs room for ``S + len(draft) + max_new_tokens`` more positions.
        """
        if max_new_tokens <= 0:
            return
        view = KVCache(cache.keys, cache.values)
        view.length = cache.length
        stops = sorted({int(s) for s in stop_ids if 0 <= int(s) < self.cfg.vocab_size})
        draft = list(draft)[: max_new_tokens - 1]
        if draft:
            with torch.inference_mode():
                ids = torch.as_tensor(draft, dtype=torch.long, device=self.device)
                embeds = torch.cat([embeds.to(self.dtype), self.model.embed_tokens(ids).to(self.dtype)])
        logits = self.extend(view, embeds, len(draft) + 1)
        start, n = view.length - len(draft), 0  # start: where draft[0] was written
        for i in range(len(draft) + 1):
            step = _choose(logits[i : i + 1], stops if n < min_new_tokens else [])[0]
            yield step
            n += 1
            if step.token in stops or n == max_new_tokens:
                return
            if i == len(draft) or step.token != draft[i]:
                break
        view.length = start + i  # keys of the confirmed draft tokens only
        batch = _Batch(view, [view.length], self.device, fixed=self.graphs)
        while True:
            logits = self._step(batch, [step.token])
            step = _choose(logits, stops if n < min_new_tokens else [])[0]
            yield step
            n += 1
            if step.token in stops or n == max_new_tokens:
                return


class _TracedStep(nn.Module):
    """A one-row decoding step on the CPU, recorded once by ``torch.jit.trace`` and replayed for each token.

    An eager step of 0.6B makes ≈2,400 Python-level module and operator calls; the recording runs the same
    operators from TorchScript's interpreter (its optimizing passes off), so its logits equal the eager
    ones exactly and it spends less in Python. Measured on 2 cores of an Intel Xeon (0.6B, 150-token
    prompt, 40 tokens): w8a8 44.7-47.4 -> 36.2-37.7 ms/token, bf16 93-96 -> 88-92; recording costs ≈0.6 s.
    The cache buffers, the slot written and the span attended to (the length of a tensor) are inputs, so
    one recording serves every cache and length.
    """

    def __init__(self, model: TextModel, head: Head) -> None:
        super().__init__()
        self.model = model
        self.head = head  # registered when it is a module (an untied ``lm_head``), so that the trace sees it

    def forward(
        self,
        token: torch.Tensor,
        position: torch.Tensor,
        slot: torch.Tensor,
        span: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        cache = _SlotCache(keys, values, slot, span.shape[0])
        hidden = self.model(self.model.embed_tokens(token), position, cache)
        return self.head(hidden[:, -1]).float()

    @classmethod
    def record(cls, model: TextModel, head: Head, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule | None:
        """The step traced on ``inputs`` (it writes their slot of the cache), or ``None`` with a warning."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is, not yet removed
                # not storing the example inputs: they hold the KV cache being decoded, which would stay
                # allocated for good (a 60 s clip's: 95 MB for 0.6B; a 20-minute piece's: about 2 GB)
                return torch.jit.trace(cls(model, head), inputs, check_trace=False, _store_inputs=False)
        except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
            warnings.warn(f"decoding without a recorded step: tracing it failed ({exc})", RuntimeWarning, stacklevel=3)
            return None


def _trace_after() -> int | None:
    """``MLX_ASR_TRACE_AFTER``: eager one-row steps before recording (default :data:`TRACE_AFTER`; ``off``: never)."""
    value = os.environ.get("MLX_ASR_TRACE_AFTER", "").strip().lower()
    if value in ("off", "never", "none"):
        return None
    return int(value) if value.isdigit() else TRACE_AFTER


class _StepGraph:
    """A decoding step of a batch over its KV cache buffer, captured as a CUDA graph and replayed for each token.

    The captured step reads every slot of the buffer under a mask (each row's real keys up to the current
    slot), so its shapes stay the same from token to token; the tokens, positions and mask are copied into
    tensors that the graph reads. Capturing runs one eager step first (on a side stream, as CUDA graphs
    require): it writes the same keys and values at the current slot as the replay that follows. Off CUDA
    the same fixed-shape step runs eagerly (which is how the tests check it on any machine).
    """

    def __init__(self, decoder: Decoder, batch: _Batch) -> None:
        cache = batch.cache
        device = cache.keys.device
        self.decoder, self.keys, self.values = decoder, cache.keys, cache.values
        self.tokens = torch.tensor(batch.tokens, device=device)[:, None]
        self.positions = batch.positions[:, None].clone()
        self.real = batch.real.clone()
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=device)
        self.slots = torch.arange(cache.keys.shape[3], device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type == "cuda":
            self._capture(device)

    def _capture(self, device: torch.device) -> None:
        """Capture the step as a CUDA graph. Where that fails, warn, keep this step eager and turn the
        decoder's graphs off (later decodings take the plain eager path)."""
        try:
            with torch.cuda.device(device):  # the graph's streams on the model's GPU, not the current one
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self._forward()  # kernels chosen and workspaces allocated before the capture
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.logits = self._forward()
        except RuntimeError as exc:
            self.decoder.graphs = False
            warnings.warn(f"decoding without CUDA graphs: capturing one failed ({exc})", RuntimeWarning, stacklevel=2)
            return
        self.graph = graph

    def _forward(self) -> torch.Tensor:
        model = self.decoder.model
        cache = _SlotCache(self.keys, self.values, self.slot)
        mask = (self.real & (self.slots <= self.slot))[:, None, None]
        hidden = model(model.embed_tokens(self.tokens), self.positions, cache, mask)
        return self.decoder.logits(hidden[:, -1])

    def __call__(self, batch: _Batch) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` after ``batch.tokens`` (valid until the next call)."""
        if len(batch.tokens) == 1:
            self.tokens.fill_(batch.tokens[0])
        else:
            self.tokens.copy_(torch.tensor(batch.tokens)[:, None])
        self.positions.copy_(batch.positions[:, None])
        self.real.copy_(batch.real)
        self.slot.fill_(batch.cache.length)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


class _Batch:
    """Decoding state of left-padded rows: the cache, each row's next position and its real keys.

    ``fixed``: the rows stay in the cache to the end, for fixed-shape steps (:class:`_StepGraph`); ``live``
    lists the rows still decoding and ``tokens`` every row's latest token.
    """

    def __init__(self, cache: KVCache, lengths: list[int], device: torch.device, fixed: bool = False) -> None:
        self.cache = cache
        self.fixed = fixed
        self.live = list(range(len(lengths)))
        self.tokens = [0] * len(lengths)
        longest = max(lengths)
        self.positions = torch.tensor(lengths, device=device)
        capacity = cache.keys.shape[3]
        pads = torch.tensor([longest - n for n in lengths], device=device)
        self.real = torch.arange(capacity, device=device)[None, :] >= pads[:, None]
        self.padded = longest != min(lengths)

    def mask(self) -> torch.Tensor | None:
        """Key mask ``[B, 1, 1, length + 1]`` for the next step, ``None`` when no row is padded."""
        if not self.padded:
            return None
        return self.real[:, None, None, : self.cache.length + 1]

    @torch.inference_mode()
    def select(self, keep: list[int]) -> None:
        """Keep only the live rows ``keep`` (indices into ``live``): finished rows leave the batch, or only
        ``live`` when the batch is ``fixed``."""
        if self.fixed:
            self.live = [self.live[i] for i in keep]
            return
        rows = torch.tensor(keep, device=self.positions.device)
        self.cache.select(rows)
        self.positions = self.positions[rows]
        self.real = self.real[rows]


@torch.inference_mode()
def _choose(logits: torch.Tensor, suppress: list[int]) -> list[Step]:
    """Greedy tokens (first index on ties) and their log-probabilities under the unmasked logits."""
    masked = logits
    if suppress:
        masked = logits.clone()
        masked[:, suppress] = float("-inf")
    tokens = masked.argmax(dim=-1)
    logprobs = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return [Step(int(t), float(p)) for t, p in zip(tokens.tolist(), logprobs.tolist(), strict=True)]
