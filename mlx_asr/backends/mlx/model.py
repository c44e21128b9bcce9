"""The Qwen3-ASR module tree (named like the checkpoint tensors) and its weight loading.

Loads official folders and folders written by ``mlx-asr convert`` (same tensor names; quantized
modules carry ``.scales``/``.biases`` and are listed in config.json's ``quantization`` block).
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ...checkpoint import LM_HEAD, Checkpoint
from ...errors import BackendError, ModelError
from ...quantize import QuantPolicy, module_params
from .encoder import AudioTower
from .llm import TextModel, output_head

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_CONV_WEIGHT = re.compile(r"thinker\.audio_tower\.conv2d\d+\.weight")


class Thinker(nn.Module):
    """``thinker``: audio tower, Qwen3 decoder and (untied checkpoints only) ``lm_head``."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        config = checkpoint.config
        self.audio_tower = AudioTower(config.audio, checkpoint.projector_layers, checkpoint.has_ln_post)
        self.model = TextModel(config.text)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @property
    def output_head(self):
        """Hidden -> logits: ``lm_head`` when untied, else ``embed_tokens`` as a (possibly quantized) linear."""
        return output_head(self.model, self["lm_head"] if "lm_head" in self else None)

    @property
    def output_matrix(self) -> mx.array:
        """``[vocab, hidden]`` float output matrix (``embed_tokens`` when tied); not for quantized heads."""
        module = self.lm_head if "lm_head" in self else self.model.embed_tokens
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            raise BackendError("the output head is quantized; use output_head")
        return module.weight


class Qwen3ASR(nn.Module):
    """Top-level module: ``thinker.*`` exactly as in the official checkpoint."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.thinker = Thinker(checkpoint)


def _read_weights(checkpoint: Checkpoint, dtype: mx.Dtype) -> dict[str, mx.array]:
    """All tensors of the checkpoint (lazily), floats cast to ``dtype``, conv weights made NHWC.

    Packed quantized weights (``uint32``) keep their type; their scales and biases take ``dtype``.
    """
    tied = checkpoint.config.text.tie_word_embeddings
    weights: dict[str, mx.array] = {}
    for path in checkpoint.files:
        weights.update(mx.load(str(path)))
    if tied:
        for name in [n for n in weights if n.startswith(LM_HEAD[: -len("weight")])]:
            weights.pop(name)
    elif LM_HEAD not in weights:
        raise ModelError(f"{checkpoint.path}: untied embeddings but no {LM_HEAD} in the weights")
    for name, value in weights.items():
        if _CONV_WEIGHT.fullmatch(name) and value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        weights[name] = value
    return weights


def _quantize_stored(model: Qwen3ASR, checkpoint: Checkpoint) -> None:
    """Swap in ``QuantizedLinear``/``QuantizedEmbedding`` where a converted folder stores quantized weights."""
    block = checkpoint.config.quantization or {}
    names = checkpoint.tensor_names

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        params = module_params(block, path, f"{path}.scales" in names)
        if params is not None and f"{path}.scales" not in names:
            raise ModelError(f"{checkpoint.path}: config quantizes {path} but the weights have no {path}.scales")
        return params or False

    nn.quantize(model, class_predicate=predicate)


def quantize_model(model: Qwen3ASR, policy: QuantPolicy) -> None:
    """Quantize a loaded float model in place with the converter's policy (on-the-fly ``quantize``)."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or "weight" not in module:
            return False
        return policy.params_for(path, tuple(module.weight.shape)) or False

    nn.quantize(model, class_predicate=predicate)


def store_column_major(model: nn.Module) -> None:
    """Keep every float32 ``Linear``/``Embedding`` weight ``[out, in]`` in column-major memory (MLX's CPU).

    The weight stays an ``[out, in]`` array with the same values (a transposed view of a contiguous
    ``[in, out]`` copy), so the modules and their names are unchanged; but ``x @ W.T`` then hands BLAS an
    untransposed right-hand matrix. MLX's CPU matmul is one ``sgemm`` call whatever the shape, and both
    OpenBLAS and MLX's bundled BLAS are faster that way, most for the one-row products of decoding.
    Measured (2 AVX2 cores, ``[1, 2048] @ [2048, 6144]``, float32): OpenBLAS 4.7 -> 3.3 ms, bundled BLAS
    13.6 -> 7.2 ms; 150 rows 32.8 -> 31.1 ms and 2047 -> 1140 ms. Half-precision products do not go to
    BLAS (no difference measured beyond noise) and quantized layers have their own kernel: both are left as
    they are. Weights are converted one at a time, so the extra memory is one matrix.
    """
    for _, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Embedding) and module.weight.dtype == mx.float32:
            module.weight = mx.contiguous(module.weight.T).T
            mx.eval(module.weight)


def load_model(checkpoint: Checkpoint, dtype: str, quantize: QuantPolicy | None = None) -> Qwen3ASR:
    """Build the module tree for ``checkpoint``, load its weights in compute ``dtype``, fuse projections.

    ``quantize`` quantizes a float checkpoint after loading (a converted folder is faster and smaller
    to load); a checkpoint that is already quantized cannot be quantized again. On the CPU device the
    float32 matrices are then stored column-major (:func:`store_column_major`).
    """
    if quantize is not None and checkpoint.is_quantized:
        raise BackendError(f"{checkpoint.path} is already quantized; load it without quantize")
    model = Qwen3ASR(checkpoint)
    if checkpoint.is_quantized:
        _quantize_stored(model, checkpoint)
    weights = _read_weights(checkpoint, DTYPES[dtype])
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelError(f"{checkpoint.path}: weights do not match the config ({exc})") from exc
    del weights
    model.eval()
    if quantize is not None:
        quantize_model(model, quantize)
    mx.eval(model.parameters())
    model.thinker.model.fuse()
    if mx.default_device() == mx.cpu:
        store_column_major(model)
    mx.clear_cache()
    return model
