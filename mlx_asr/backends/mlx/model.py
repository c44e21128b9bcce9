"""The Qwen3-ASR module tree (named like the checkpoint tensors) and its weight loading."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.qwen3 import Qwen3Model

from ...checkpoint import LM_HEAD, Checkpoint
from ...errors import ModelError
from .encoder import AudioTower
from .llm import model_args

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_CONV_WEIGHT = re.compile(r"thinker\.audio_tower\.conv2d\d+\.weight")


class Thinker(nn.Module):
    """``thinker``: audio tower, Qwen3 decoder and (untied checkpoints only) ``lm_head``."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        config = checkpoint.config
        self.audio_tower = AudioTower(config.audio, checkpoint.projector_layers, checkpoint.has_ln_post)
        self.model = Qwen3Model(model_args(config.text))
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @property
    def output_matrix(self) -> mx.array:
        """``[vocab, hidden]`` output projection: ``embed_tokens`` when tied, else ``lm_head``."""
        if "lm_head" in self:
            return self.lm_head.weight
        return self.model.embed_tokens.weight


class Qwen3ASR(nn.Module):
    """Top-level module: ``thinker.*`` exactly as in the official checkpoint."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.thinker = Thinker(checkpoint)


def _read_weights(checkpoint: Checkpoint, dtype: mx.Dtype) -> dict[str, mx.array]:
    """All tensors of the checkpoint (lazily), floats cast to ``dtype``, conv weights made NHWC."""
    tied = checkpoint.config.text.tie_word_embeddings
    weights: dict[str, mx.array] = {}
    for path in checkpoint.files:
        weights.update(mx.load(str(path)))
    if tied:
        weights.pop(LM_HEAD, None)
    elif LM_HEAD not in weights:
        raise ModelError(f"{checkpoint.path}: untied embeddings but no {LM_HEAD} in the weights")
    for name, value in weights.items():
        if _CONV_WEIGHT.fullmatch(name) and value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        weights[name] = value
    return weights


def load_model(checkpoint: Checkpoint, dtype: str) -> Qwen3ASR:
    """Build the module tree for ``checkpoint`` and load its weights in compute ``dtype``."""
    model = Qwen3ASR(checkpoint)
    weights = _read_weights(checkpoint, DTYPES[dtype])
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelError(f"{checkpoint.path}: weights do not match the config ({exc})") from exc
    model.eval()
    mx.eval(model.parameters())
    return model
