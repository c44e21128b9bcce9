"""Find and validate the safetensors files of a Qwen3-ASR folder (single-file or sharded)."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig, load_config
from .errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
AUDIO_PREFIX = "thinker.audio_tower."
TEXT_PREFIX = "thinker.model."
LM_HEAD = "thinker.lm_head.weight"


@dataclass(frozen=True)
class Checkpoint:
    """A validated model folder: its config, weight files and what the weights hold."""

    path: Path
    config: ModelConfig
    files: tuple[Path, ...]
    tensor_names: frozenset[str]
    projector_layers: int
    has_ln_post: bool

    @property
    def has_lm_head(self) -> bool:
        return LM_HEAD in self.tensor_names

    @property
    def is_quantized(self) -> bool:
        return self.config.quantization is not None

    @property
    def format(self) -> str:
        """``"mlx"`` for a folder written by ``mlx-asr convert`` (config.json has an ``mlx_asr`` block),
        else ``"official"``. Both use the official tensor names; only MLX can load quantized ones."""
        info = self.config.raw.get("mlx_asr")
        return "mlx" if isinstance(info, dict) and info.get("format") == "mlx" else "official"


def _header_names(path: Path) -> set[str]:
    """Tensor names of one safetensors file, read from its header only (fast, validates the file)."""
    try:
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ModelError(f"{path.name}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            size = path.stat().st_size
            if header_len > size - 8:
                raise ModelError(f"{path.name}: truncated or corrupt safetensors header")
            header = json.loads(fh.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path.name}: not a readable safetensors file ({exc})") from exc
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelError(
            f"{path.name}: truncated safetensors file ({size} bytes, header needs {8 + header_len + end})"
        )
    return {k for k in header if k != "__metadata__"}


def weight_files(model_dir: Path) -> tuple[Path, ...]:
    """The safetensors files of a folder: the index's shards, else ``model.safetensors``."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise ModelError(f"{index.name}: unreadable shard index ({exc})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelError(f"{model_dir}: missing weight shard(s) {', '.join(missing)}")
        return tuple(model_dir / n for n in names)
    single = model_dir / "model.safetensors"
    if single.is_file():
        return (single,)
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return tuple(found)
    raise ModelError(f"{model_dir}: no model.safetensors (or sharded safetensors with an index)")


def _required_names(config: ModelConfig) -> list[str]:
    names = [f"{AUDIO_PREFIX}conv2d{i}.weight" for i in (1, 2, 3)] + [f"{AUDIO_PREFIX}conv_out.weight"]
    names += [f"{AUDIO_PREFIX}layers.{i}.fc1.weight" for i in range(config.audio.encoder_layers)]
    names += [f"{TEXT_PREFIX}embed_tokens.weight", f"{TEXT_PREFIX}norm.weight"]
    names += [f"{TEXT_PREFIX}layers.{j}.self_attn.q_proj.weight" for j in range(config.text.num_hidden_layers)]
    return names


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Validate a model folder and describe its weights, raising :class:`ModelError` on problems."""
    path = Path(model_dir)
    if not path.exists():
        raise ModelError(f"{model_dir}: model folder not found")
    if not path.is_dir():
        raise ModelError(f"{model_dir}: is a file, expected a model folder")
    config = load_config(path)
    files = weight_files(path)
    names: set[str] = set()
    for f in files:
        names |= _header_names(f)
    missing = [n for n in _required_names(config) if n not in names]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{model_dir}: weights lack {', '.join(missing[:3])}{more}")
    if config.quantization is not None:
        from .quantize import validate_block

        validate_block(config.quantization, f"{model_dir}/config.json")
        if not any(n.endswith(".scales") for n in names):
            raise ModelError(f"{model_dir}: config.json has a quantization block but the weights hold no scales")
    proj = {int(m.group(1)) for n in names if (m := re.fullmatch(r"thinker\.audio_tower\.proj(\d+)\.weight", n))}
    if not proj or proj != set(range(1, max(proj) + 1)):
        raise ModelError(f"{model_dir}: audio projector weights proj1..projN missing or not contiguous")
    return Checkpoint(
        path=path,
        config=config,
        files=files,
        tensor_names=frozenset(names),
        projector_layers=max(proj),
        has_ln_post=f"{AUDIO_PREFIX}ln_post.weight" in names,
    )
