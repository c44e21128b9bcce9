"""Which weights get quantized, at how many bits: the policy shared by the converter and the MLX loader.

Affine group quantization as in ``mlx.nn.quantize`` / mlx-lm: a ``[out, in]`` linear (or embedding)
weight becomes a packed ``uint32`` ``weight`` plus ``scales`` and ``biases`` (one per ``group_size``
inputs). The converted ``config.json`` carries an mlx-lm style ``quantization`` block: the default
``bits``/``group_size``/``mode`` (those of the LLM linear layers) and one entry per module that differs
from it, either its own ``{"bits", "group_size", "mode"}`` or ``false`` (kept in floating point).

Policy (defaults chosen to keep accuracy; see ``benchmarks/bench_mlx.py`` for the measurements):

* LLM linear layers (``q/k/v/o_proj``, ``gate/up/down_proj``): the chosen ``bits`` (4 or 8).
* Audio encoder linears (attention, feed-forward, ``conv_out``, ``proj1``/``proj2``): 8 bit by default,
  whatever the LLM bits (Qwen3-ASR towers quantized to 4 bit degrade on long audio). The three
  convolutions and every norm and bias stay in floating point.
* ``embed_tokens`` (also the output head when the embeddings are tied) and an untied ``lm_head``:
  8 bit by default, chosen by measurement: on the fixture an 8-bit table keeps every first-step cosine
  >= 0.999 and the same teacher-forced tokens as a float table (a 4-bit table loses about half of them),
  and a 4-bit 0.6B pipeline peaks at 0.84 GB with it against 0.98 GB with a bfloat16 table.
  ``none`` keeps it in floating point.

A weight whose input size is not a multiple of ``group_size`` stays in floating point (and is listed as
``false``), so any model converts.

This module is pure Python (no MLX import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ModelError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"
DEFAULT_GROUP_SIZE = 64
DEFAULT_AUDIO_BITS = 8
DEFAULT_EMBED_BITS = 8

AUDIO_LINEAR = re.compile(
    r"thinker\.audio_tower\.(?:layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|fc1|fc2)|conv_out|proj\d+)"
)
TEXT_LINEAR = re.compile(
    r"thinker\.model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)
EMBEDDING = "thinker.model.embed_tokens"
LM_HEAD = "thinker.lm_head"


def parse_bits(value: int | str | None, what: str) -> int | None:
    """``4``/``8`` as an int; ``None``, ``0``, ``"none"``, ``"float"`` as ``None`` (not quantized)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "float", "0", "")):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        raise ModelError(f"{what}: expected 4, 8 or none, not {value!r}") from None
    if bits == 0:
        return None
    if bits not in BITS:
        raise ModelError(f"{what}: expected 4, 8 or none, not {value!r}")
    return bits


@dataclass(frozen=True)
class QuantPolicy:
    """Bits per weight family; ``None`` keeps that family in floating point.

    Args:
        bits: LLM linear layers (4 or 8); also the ``quantization`` block's default.
        group_size: inputs per scale/bias (32, 64 or 128), for every quantized weight.
        audio_bits: audio encoder linears (default 8).
        embed_bits: ``embed_tokens``, which is also the output head of tied models (default 8).
        head_bits: an untied ``lm_head`` (default: ``embed_bits``).
    """

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    audio_bits: int | None = DEFAULT_AUDIO_BITS
    embed_bits: int | None = DEFAULT_EMBED_BITS
    head_bits: int | None = DEFAULT_EMBED_BITS
    mode: str = MODE

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ModelError(f"quantization bits must be 4 or 8, not {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise ModelError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {self.group_size!r}")
        for name in ("audio_bits", "embed_bits", "head_bits"):
            value = getattr(self, name)
            if value is not None and value not in BITS:
                raise ModelError(f"{name} must be 4, 8 or None, not {value!r}")

    @classmethod
    def create(
        cls,
        bits: int | str,
        group_size: int = DEFAULT_GROUP_SIZE,
        audio_bits: int | str | None = DEFAULT_AUDIO_BITS,
        embed_bits: int | str | None = DEFAULT_EMBED_BITS,
        head_bits: int | str | None = "same",
    ) -> QuantPolicy:
        """Build a policy from user values (``"none"`` strings allowed); ``head_bits="same"`` follows the embedding."""
        llm = parse_bits(bits, "bits")
        if llm is None:
            raise ModelError("quantization bits must be 4 or 8")
        embed = parse_bits(embed_bits, "embed bits")
        head = embed if head_bits == "same" else parse_bits(head_bits, "head bits")
        return cls(llm, int(group_size), parse_bits(audio_bits, "audio bits"), embed, head)

    def bits_for(self, module: str) -> int | None:
        """Bits for the module at path ``module`` (``thinker.…``, no ``.weight``); ``None`` = keep float."""
        if TEXT_LINEAR.fullmatch(module):
            return self.bits
        if AUDIO_LINEAR.fullmatch(module):
            return self.audio_bits
        if module == EMBEDDING:
            return self.embed_bits
        if module == LM_HEAD:
            return self.head_bits
        return None

    def params_for(self, module: str, shape: tuple[int, ...]) -> dict[str, Any] | None:
        """``{"group_size", "bits", "mode"}`` for a 2-D weight of ``shape``, or ``None`` to keep it float."""
        bits = self.bits_for(module)
        if bits is None or len(shape) != 2 or shape[-1] % self.group_size:
            return None
        return {"group_size": self.group_size, "bits": bits, "mode": self.mode}

    def summary(self, tied: bool) -> dict[str, str]:
        """Human-readable setting per family (written to config.json and the model card)."""

        def text(bits: int | None) -> str:
            return f"{bits}-bit, group {self.group_size} ({self.mode})" if bits else "not quantized"

        out = {
            "llm_linear": text(self.bits),
            "audio_encoder_linear": text(self.audio_bits),
            "audio_convolutions_norms_biases": "not quantized",
            "embed_tokens": text(self.embed_bits) + (" (also the tied output head)" if tied else ""),
        }
        out["lm_head"] = "tied to embed_tokens (not stored)" if tied else text(self.head_bits)
        return out

    def describe(self) -> dict[str, Any]:
        """Machine-readable policy (written to config.json)."""
        return {
            "bits": self.bits, "group_size": self.group_size, "mode": self.mode,
            "audio_bits": self.audio_bits, "embed_bits": self.embed_bits, "head_bits": self.head_bits,
        }


def quantization_block(policy: QuantPolicy, modules: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The mlx-lm style ``quantization`` block for ``{module path: params or None}``, sorted by path.

    Only modules that differ from the default (``policy.bits``) get an entry; modules kept in floating
    point that the default would otherwise cover are listed as ``false``.
    """
    default = {"group_size": policy.group_size, "bits": policy.bits, "mode": policy.mode}
    block: dict[str, Any] = dict(default)
    for module in sorted(modules):
        params = modules[module]
        if params is None:
            block[module] = False
        elif params != default:
            block[module] = dict(params)
    return block


def module_params(block: dict[str, Any], module: str, quantized: bool) -> dict[str, Any] | None:
    """Quantization params of ``module`` from a ``quantization`` block (the loader's side).

    An explicit entry wins (``false`` = float); otherwise the module is quantized with the block's
    defaults exactly when the weights hold ``<module>.scales`` (``quantized``), as in mlx-lm.
    """
    entry = block.get(module)
    if entry is False:
        return None
    if isinstance(entry, dict):
        return {k: entry[k] for k in ("group_size", "bits", "mode") if k in entry}
    if not quantized:
        return None
    return {"group_size": block["group_size"], "bits": block["bits"], "mode": block.get("mode", MODE)}


def validate_block(block: Any, where: str) -> dict[str, Any]:
    """Check a ``quantization`` block read from config.json; raise :class:`ModelError` if malformed."""
    if not isinstance(block, dict):
        raise ModelError(f"{where}: 'quantization' must be an object")
    for key in ("group_size", "bits"):
        if not isinstance(block.get(key), int):
            raise ModelError(f"{where}: 'quantization' lacks an integer {key!r}")
    for key, value in block.items():
        if key in ("group_size", "bits", "mode") or value is False:
            continue
        if not isinstance(value, dict) or not isinstance(value.get("bits"), int):
            raise ModelError(f"{where}: quantization entry {key!r} must be false or {{'bits', 'group_size'}}")
    return block
