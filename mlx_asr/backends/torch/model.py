"""The module tree of a Qwen3-ASR checkpoint (names mirror its tensors) and fast, memory-mapped loading."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ...checkpoint import Checkpoint
from ...errors import ModelError
from .compute import release_scratch
from .encoder import AudioTower
from .llm import Head, Linear, TextModel
from .quant import (
    W8A8,
    DynamicInt8Linear,
    QuantEmbedding,
    check_audio_w8a8,
    check_bits,
    finish_packing,
    quantize_head,
    quantize_layer,
)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Thinker(nn.Module):
    """``thinker``: ``audio_tower``, ``model`` (Qwen3) and, for untied checkpoints, ``lm_head``."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        cfg = checkpoint.config
        self.audio_tower = AudioTower(cfg.audio, checkpoint.projector_layers, checkpoint.has_ln_post)
        self.model = TextModel(cfg.text)
        self.tied = cfg.text.tie_word_embeddings
        self.lm_head = None if self.tied else Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def output_head(self) -> Head:
        """Final hidden states -> logits: ``embed_tokens`` as the output matrix when tied, else ``lm_head``."""
        if self.lm_head is not None:
            return self.lm_head
        embed = self.model.embed_tokens
        if isinstance(embed, QuantEmbedding):
            return embed.project
        return lambda hidden: F.linear(hidden, embed.weight)


class Qwen3ASR(nn.Module):
    """Root module, so that ``state_dict`` names equal the checkpoint's (``thinker.…``)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.thinker = Thinker(checkpoint)


def _read_tensors(
    checkpoint: Checkpoint, wanted: set[str], dtype: torch.dtype, device: torch.device
) -> tuple[dict[str, torch.Tensor], bool]:
    """Memory-mapped tensors of every shard, and whether any had to be copied (new dtype or device)."""
    tensors: dict[str, torch.Tensor] = {}
    copied = False
    for path in checkpoint.files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name in wanted:
                    mapped = handle.get_tensor(name)
                    tensors[name] = mapped.to(device=device, dtype=dtype)
                    copied = copied or tensors[name].data_ptr() != mapped.data_ptr()
    return tensors, copied


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    The quantizing load frees hundreds of MB of transient bf16 buffers; glibc keeps most of them mapped
    (its mmap threshold grows with freed large blocks), which would count in the resident size for good.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass


class _TensorReader:
    """Reads single tensors of a (sharded) checkpoint, each through its own memory map.

    A tensor's pages come from the page cache without a copy and are unmapped when the tensor is freed,
    so the quantizing load holds one layer of float weights at a time. Measured against ``pread`` into
    fresh buffers (0.6B, w8a8): 0.9 -> 0.7 M page faults, load ~5 % faster, the same peak RSS.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.path = checkpoint.path
        self.files: dict[str, Path] = {}  # tensor name -> its file
        for path in checkpoint.files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor ``name`` memory-mapped in the checkpoint's dtype: only the pages read become resident."""
        with safe_open(str(self.files[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def read(self, name: str, like: torch.Tensor, device: torch.device) -> nn.Parameter:
        """Tensor ``name`` as a frozen parameter of ``like``'s shape and dtype on ``device``."""
        tensor = self.mapped(name)
        if tuple(tensor.shape) != tuple(like.shape):
            raise ModelError(
                f"{self.path}: weights do not fit the config ({name}: shape {list(tensor.shape)} in the checkpoint, "
                f"{list(like.shape)} expected)"
            )
        return nn.Parameter(tensor.to(device=device, dtype=like.dtype), requires_grad=False)


LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


AUDIO_LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2",
)  # fmt: skip


def _audio_linears(tower: AudioTower) -> list[list[str]]:
    """The audio tower's linear modules (names under ``thinker.audio_tower``), per encoder layer, then
    ``conv_out`` and ``proj1``..``projN``; the 3x3 convolutions are not among them."""
    groups = [[f"layers.{i}.{name}" for name in AUDIO_LAYER_LINEARS] for i in range(len(tower.layers))]
    return groups + [["conv_out", *(f"proj{i}" for i in range(1, tower.projector_layers + 1))]]


def _audio_tensor_names(tower: AudioTower) -> set[str]:
    """Checkpoint names of the weights and biases of :func:`_audio_linears`."""
    names = set()
    for module in (m for group in _audio_linears(tower) for m in group):
        names.add(f"thinker.audio_tower.{module}.weight")
        if tower.get_submodule(module).bias is not None:
            names.add(f"thinker.audio_tower.{module}.bias")
    return names


def _quantized_names(thinker: Thinker) -> tuple[list[list[str]], str]:
    """Per decoder layer, the checkpoint names of its linear weights; and the name of the output matrix."""
    layers = [
        [f"thinker.model.layers.{j}.{linear}.weight" for linear in LAYER_LINEARS]
        for j in range(len(thinker.model.layers))
    ]
    head = "thinker.model.embed_tokens.weight" if thinker.lm_head is None else "thinker.lm_head.weight"
    return layers, head


def _load_quantized(
    model: Qwen3ASR, reader: _TensorReader, dtype: torch.dtype, device: torch.device, bits: int | str
) -> None:
    """Read the LLM's linear weights and output matrix one layer at a time and quantize them as they come.

    Each bf16 layer is mapped, quantized, then dropped, so the peak memory is the quantized model plus one
    layer (or the embedding table), not the whole bf16 LLM.
    """
    thinker = model.thinker
    layers, head = _quantized_names(thinker)
    owner = thinker.lm_head if thinker.lm_head is not None else thinker.model.embed_tokens
    owner.weight = reader.read(head, owner.weight.to(dtype=dtype), device)  # the largest first
    del owner  # quantize_head replaces the module: its bf16 matrix must not outlive it
    table = reader.mapped(head) if bits == W8A8 and thinker.lm_head is None else None
    quantize_head(thinker, bits, table)
    for layer, names in zip(thinker.model.layers, layers, strict=True):
        for linear, name in zip(LAYER_LINEARS, names, strict=True):
            module = layer.get_submodule(linear)
            module.weight = reader.read(name, module.weight.to(dtype=dtype), device)
        quantize_layer(layer, bits)
        release_free_memory()  # the layer's freed float buffers (and fbgemm's packing temporaries)


def _load_audio_w8a8(tower: AudioTower, reader: _TensorReader, dtype: torch.dtype, device: torch.device) -> None:
    """Read the audio tower's linears one encoder layer at a time and replace them with W8A8 layers."""
    for group in _audio_linears(tower):
        for module in group:
            owner_name, _, child = module.rpartition(".")
            owner = tower.get_submodule(owner_name) if owner_name else tower
            linear = getattr(owner, child)
            weight = reader.read(f"thinker.audio_tower.{module}.weight", linear.weight.to(dtype=dtype), device)
            bias = linear.bias
            if bias is not None:
                bias = reader.read(f"thinker.audio_tower.{module}.bias", bias.to(dtype=dtype), device)
            setattr(owner, child, DynamicInt8Linear([weight], bias))
        release_free_memory()


def _lacking(path: Path, missing: list[str]) -> ModelError:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return ModelError(f"{path}: weights lack {', '.join(missing[:3])}{more}")


def load_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    fuse: bool | None = None,
    quantize: int | str | None = None,
    quantize_audio: bool = False,
) -> Qwen3ASR:
    """Build the module tree without initialising it and assign the checkpoint's tensors (memory-mapped).

    ``fuse``: concatenate the LLM's q/k/v and gate/up weights (~6 % faster decoding, but a copy of
    those weights at load); ``None`` fuses only when the weights were copied anyway (dtype or device
    change), so a checkpoint already in ``dtype`` on the CPU loads without copying anything.
    ``quantize`` (8, 4 or ``"w8a8"``): the LLM's linears (fused) and the output matrix are read layer by layer and
    quantized as they come (see :mod:`.quant`); ``fuse`` is then ignored. ``quantize_audio``: the audio
    tower's linears (not its convolutions) are read the same way and become W8A8 layers (x86 CPU only).
    A stored ``thinker.lm_head.weight`` is ignored when the embeddings are tied (``embed_tokens`` is the
    output matrix, as in vLLM). Raises :class:`ModelError` when tensors are missing or misshapen.
    """
    if quantize is not None:
        check_bits(quantize, device)
    if quantize_audio:
        check_audio_w8a8(device)
    with torch.device("meta"):
        model = Qwen3ASR(checkpoint)
    wanted = set(model.state_dict())
    deferred: set[str] = set()
    if quantize is not None:
        layers, head = _quantized_names(model.thinker)
        deferred |= {head, *(n for names in layers for n in names)}
    if quantize_audio:
        deferred |= _audio_tensor_names(model.thinker.audio_tower)
    tensors, copied = _read_tensors(checkpoint, wanted - deferred, dtype, device)
    missing = sorted(wanted - deferred - tensors.keys())
    if missing:
        raise _lacking(checkpoint.path, missing)
    try:
        model.load_state_dict(tensors, strict=not deferred, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelError(f"{checkpoint.path}: weights do not fit the config ({first})") from exc
    del tensors
    if deferred:
        reader = _TensorReader(checkpoint)
        missing = sorted(deferred - reader.files.keys())
        if missing:
            raise _lacking(checkpoint.path, missing)
        if quantize is not None:
            _load_quantized(model, reader, dtype, device, quantize)
        if quantize_audio:
            _load_audio_w8a8(model.thinker.audio_tower, reader, dtype, device)
        finish_packing(model)
        release_scratch()
        release_free_memory()
    model.requires_grad_(False)
    if quantize is None and (copied if fuse is None else fuse):
        model.thinker.model.fuse()
    return model
