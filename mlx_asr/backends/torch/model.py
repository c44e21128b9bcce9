"""The module tree of a Qwen3-ASR checkpoint (names mirror its tensors) and fast, memory-mapped loading."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ...checkpoint import Checkpoint
from ...errors import ModelError
from .encoder import AudioTower
from .llm import Head, Linear, TextModel
from .quant import QuantEmbedding

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


def load_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, fuse: bool | None = None) -> Qwen3ASR:
    """Build the module tree without initialising it and assign the checkpoint's tensors (memory-mapped).

    ``fuse``: concatenate the LLM's q/k/v and gate/up weights (~6 % faster decoding, but a copy of
    those weights at load); ``None`` fuses only when the weights were copied anyway (dtype or device
    change), so a checkpoint already in ``dtype`` on the CPU loads without copying anything.
    A stored ``thinker.lm_head.weight`` is ignored when the embeddings are tied (``embed_tokens`` is the
    output matrix, as in vLLM). Raises :class:`ModelError` when tensors are missing or misshapen.
    """
    with torch.device("meta"):
        model = Qwen3ASR(checkpoint)
    wanted = set(model.state_dict())
    tensors, copied = _read_tensors(checkpoint, wanted, dtype, device)
    missing = sorted(wanted - tensors.keys())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{checkpoint.path}: weights lack {', '.join(missing[:3])}{more}")
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelError(f"{checkpoint.path}: weights do not fit the config ({first})") from exc
    model.requires_grad_(False)
    if copied if fuse is None else fuse:
        model.thinker.model.fuse()
    return model
