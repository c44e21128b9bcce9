"""``TorchBackend``: the :class:`~mlx_asr.backends.base.Backend` on PyTorch (CPU or CUDA)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ...checkpoint import Checkpoint
from ...config import num_audio_tokens
from ...errors import BackendError
from ..base import DTYPES, Backend, Step
from .cores import FreeCores, cpu_quota
from .features import log_mel
from .llm import BATCH_PREFILL_TOKENS, Decoder
from .model import TORCH_DTYPES, load_model
from .openmp import workers_spin
from .quant import PER_ROW_MODES, W8A8


def torch_device(device: str) -> torch.device:
    """``cpu`` or ``cuda`` (``cuda:N``) as a torch device; :class:`BackendError` when it cannot be used."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise BackendError(f"the torch backend runs on cpu or cuda, not {device!r}")
    if not torch.cuda.is_available():
        raise BackendError(f"CUDA is not available to PyTorch {torch.__version__} on this machine; use --device cpu")
    return torch.device(device)


def shared_cores(device: torch.device, threads: int | None) -> FreeCores | None:
    """What caps the threads at the free cores and at the cgroup's CPU quota (see :mod:`.cores`): on a CPU, unless
    the user chose ``threads`` or set ``MLX_ASR_SHARE_CORES=0``, and where the system lets the busy cores be
    measured."""
    if device.type != "cpu" or threads is not None or os.environ.get("MLX_ASR_SHARE_CORES", "1") == "0":
        return None
    cores = FreeCores(torch.get_num_threads(), quota=cpu_quota)
    return cores if cores.available else None


class TorchBackend(Backend):
    """Qwen3-ASR on PyTorch: log-mel, windowed audio encoder + projector, Qwen3 prefill and greedy decoding.

    Args:
        checkpoint: an opened Qwen3-ASR folder.
        dtype: compute dtype, ``float32``, ``bfloat16`` or ``float16`` (the log-mel is always float32).
        device: ``cpu`` or ``cuda``.
        quantize: ``8`` or ``4`` for weight-only int8/int4 LLM linears, ``"w8a8"`` for int8 weights and
            int8 activations (fbgemm, x86 CPUs: the fastest mode there; see :mod:`.quant`); the output head
            is int8 then; ``None`` keeps ``dtype`` weights.
        quantize_audio: the audio tower's linears in W8A8 as well (x86 CPUs; its 3x3 convolutions stay in
            ``dtype``). Off by default: faster encoding (10 s clip, 2 cores: 0.87 -> 0.64 s) and about half
            the encoder's memory, but activations rounded to 7 bits (see :mod:`.quant`).
        threads: CPU threads for PyTorch (``torch.set_num_threads``); ``None`` keeps PyTorch's default.

    Shared cores: when other busy processes share the cores, a kernel on all threads waits for the thread that
    has no core. On a CPU the backend caps its threads at the cores the others leave free, measured as it
    goes, and at its cgroup's CPU quota (:mod:`.cores`; off with ``threads=N`` or ``MLX_ASR_SHARE_CORES=0``).
    It lets PyTorch's OpenMP workers spin 10000 iterations before they sleep (:mod:`.openmp`; unless
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set; ``MLX_ASR_OMP_SPIN`` changes it). 2 Zen 4 cores, 0.6B
    w8a8 + quantized audio, 10 s clip: RTF 0.19-0.21 on idle cores, 0.29-0.31 beside a busy process (0.70-0.75
    without the cap).
    """

    name = "torch"

    def __init__(
        self,
        checkpoint: Checkpoint,
        dtype: str,
        device: str,
        quantize: int | str | None = None,
        threads: int | None = None,
        quantize_audio: bool = False,
    ) -> None:
        super().__init__(checkpoint, dtype, device)
        if dtype not in DTYPES:
            raise BackendError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
        if threads is not None:
            if threads < 1:
                raise BackendError(f"threads must be at least 1, not {threads}")
            torch.set_num_threads(threads)
        self.torch_device = torch_device(device)
        self.quantize = quantize
        self.quantize_audio = quantize_audio
        # quantized: the LLM is read and quantized layer by layer (fused q/k/v and gate/up) as it loads
        self.model = load_model(
            checkpoint, TORCH_DTYPES[dtype], self.torch_device, quantize=quantize, quantize_audio=quantize_audio
        )
        thinker = self.model.thinker
        self.audio_tower = thinker.audio_tower
        prefill_tokens = 0 if quantize in PER_ROW_MODES else BATCH_PREFILL_TOKENS
        # w8a8 one-row steps where the pool's workers sleep soon (a short spin count set by the user; the default
        # spins long): the layers on one thread (fbgemm's one-row product is memory-bound and one
        # core nearly saturates it; see Decoder). Measured on 2 cores (Zen 4, 0.6B, decode-only loop, six
        # alternating pairs of processes): 44-55 against 53-64 ms/token. Not for bf16 or weight-only int8,
        # whose one-row kernels gain from the second thread (bf16 86-90 against 93-100 ms/token on one thread,
        # int8 70-72 against 88), nor for batches (8 rows: 92-101 against 108 ms/step), nor where the pool's
        # workers spin long (10000 spins: 37.5-48.0 ms/token on both threads against 45.1-57.8 on one, three
        # alternating pairs of processes): the rule pays for waking sleeping workers.
        row_threads = 1 if quantize == W8A8 and not workers_spin() else None
        cores = shared_cores(self.torch_device, threads)
        self.decoder = Decoder(thinker.model, thinker.output_head(), prefill_tokens, row_threads, cores)

    def log_mel(self, samples: np.ndarray) -> torch.Tensor:
        with self.decoder.on_free_cores():
            return log_mel(samples, self.config.audio.num_mel_bins, self.torch_device)

    @torch.inference_mode()
    def encode(self, mel: Any) -> torch.Tensor:
        with self.decoder.on_free_cores():
            return self.audio_tower(torch.as_tensor(mel, device=self.torch_device))

    @torch.inference_mode()
    def encode_batch(self, mels: Sequence[Any]) -> list[torch.Tensor]:
        with self.decoder.on_free_cores():
            return self.audio_tower.encode_batch([torch.as_tensor(m, device=self.torch_device) for m in mels])

    @torch.inference_mode()
    def embed_prompt(self, prompt_ids: Sequence[int], audio_embeds: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``[L, hidden]`` with the audio rows in the ``<|audio_pad|>`` slots, in order."""
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.torch_device)
        slots = torch.nonzero(ids == self.config.audio_token_id)[:, 0]
        if slots.shape[0] != audio_embeds.shape[0]:
            raise ValueError(
                f"prompt has {slots.shape[0]} audio placeholder tokens but the audio gives {audio_embeds.shape[0]}"
            )
        embeds = self.decoder.model.embed_tokens(ids)
        embeds[slots] = audio_embeds.to(device=embeds.device, dtype=embeds.dtype)
        return embeds

    def generate(
        self,
        prompt_ids: Sequence[int],
        audio_embeds: Any,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
    ) -> Iterator[Step]:
        embeds = self.embed_prompt(prompt_ids, audio_embeds)
        for steps in self.decoder.decode([embeds], max_new_tokens, stop_ids, min_new_tokens):
            yield steps[0][1]

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        audio_embeds: Sequence[Any],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
    ) -> list[list[Step]]:
        """Left-padded batched greedy decoding: per-row positions from 0, key mask, finished rows dropped."""
        embeds = [self.embed_prompt(p, a) for p, a in zip(prompts, audio_embeds, strict=True)]
        results: list[list[Step]] = [[] for _ in embeds]
        for steps in self.decoder.decode(embeds, max_new_tokens, stop_ids, min_new_tokens):
            for row, step in steps:
                results[row].append(step)
        return results

    def first_logits(self, prompt_ids: Sequence[int], audio_embeds: Any) -> np.ndarray:
        return self.to_numpy(self.decoder.first_logits(self.embed_prompt(prompt_ids, audio_embeds)))

    def to_numpy(self, x: Any) -> np.ndarray:
        tensor = torch.as_tensor(x).detach()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return tensor.cpu().numpy()

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)

    def peak_device_mb(self) -> float | None:
        if self.torch_device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.torch_device) / 1e6

    def cpu_threads(self) -> int | None:
        if self.torch_device.type != "cpu":
            return None
        cap = self.decoder.cores.current if self.decoder.cores else None
        return min(filter(None, (cap, torch.get_num_threads())))

    # ------------------------------------------------------------------ streaming (cached mode)
    @torch.inference_mode()
    def encode_stem(self, mel: Any) -> torch.Tensor:
        mel = torch.as_tensor(mel, device=self.torch_device)
        size, frames = self.config.audio.chunk_frames, mel.shape[1]
        padded = torch.nn.functional.pad(mel, (0, -frames % size))  # a partial chunk convolved at full width
        with self.decoder.on_free_cores():
            return self.audio_tower.conv_stem(padded)[: num_audio_tokens(frames, size)]

    @torch.inference_mode()
    def encode_window(self, stems: Sequence[Any]) -> torch.Tensor:
        with self.decoder.on_free_cores():
            return self.audio_tower.encode_window([torch.as_tensor(s) for s in stems])

    @torch.inference_mode()
    def _embeds(self, prompt_ids: Sequence[int], audio_embeds: Any | None) -> torch.Tensor:
        if audio_embeds is not None:
            return self.embed_prompt(prompt_ids, audio_embeds)
        if self.config.audio_token_id in prompt_ids:
            raise ValueError("prompt has audio placeholder tokens but no audio embeddings were given")
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.torch_device)
        return self.decoder.model.embed_tokens(ids)

    def prefill_prefix(self, prompt_ids: Sequence[int], audio_embeds: Any | None, prefix: Any | None = None) -> Any:
        embeds = self._embeds(prompt_ids, audio_embeds)
        if prefix is None:
            prefix = _Prefix(self.decoder)
        prefix.reserve(embeds.shape[0])
        self.decoder.extend(prefix.cache, embeds, last=0)
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
        embeds = self._embeds(prompt_ids, audio_embeds)
        prefix.reserve(embeds.shape[0] + len(draft) + max_new_tokens)
        return self.decoder.decode_after(prefix.cache, embeds, max_new_tokens, stop_ids, min_new_tokens, draft)


class _Prefix:
    """A reusable batch-1 KV cache of a prompt prefix; its buffer grows (by copying) when more room is needed."""

    ROOM = 256

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.cache = decoder.new_cache(1, self.ROOM)

    @torch.inference_mode()
    def reserve(self, more: int) -> None:
        """Make room for ``more`` positions after the cached ones."""
        old = self.cache
        need = old.length + more
        if need <= old.keys.shape[3]:
            return
        grown = self.decoder.new_cache(1, need + self.ROOM)
        grown.keys[:, :, :, : old.length] = old.keys[:, :, :, : old.length]
        grown.values[:, :, :, : old.length] = old.values[:, :, :, : old.length]
        grown.length = old.length
        self.cache = grown
