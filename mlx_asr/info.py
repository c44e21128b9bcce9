"""``mlx-asr info``: what a model folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import open_checkpoint


def describe(model_dir: Path) -> dict[str, Any]:
    """Sizes, dims, dtype, quantization and languages of a (validated) model folder."""
    ckpt = open_checkpoint(model_dir)
    cfg = ckpt.config
    files = sorted(p for p in ckpt.path.iterdir() if p.is_file())
    return {
        "path": str(ckpt.path),
        "files": {p.name: p.stat().st_size for p in files},
        "size_bytes": sum(p.stat().st_size for p in files),
        "weights": [p.name for p in ckpt.files],
        "tensors": len(ckpt.tensor_names),
        "dtype": cfg.dtype,
        "quantization": cfg.quantization,
        "stored_lm_head": ckpt.has_lm_head,
        "encoder": {
            "d_model": cfg.audio.d_model, "layers": cfg.audio.encoder_layers,
            "heads": cfg.audio.encoder_attention_heads, "ffn": cfg.audio.encoder_ffn_dim,
            "attention_window_s": cfg.audio.n_window_infer / 100,
        },
        "projector": {"layers": ckpt.projector_layers, "layer_norm": ckpt.has_ln_post},
        "llm": {
            "hidden": cfg.text.hidden_size, "layers": cfg.text.num_hidden_layers,
            "heads": cfg.text.num_attention_heads, "kv_heads": cfg.text.num_key_value_heads,
            "head_dim": cfg.text.head_dim, "vocab": cfg.text.vocab_size, "rope_theta": cfg.text.rope_theta,
        },
        "languages": list(cfg.support_languages),
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_description(desc: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe`."""
    enc, llm, proj = desc["encoder"], desc["llm"], desc["projector"]
    quant = desc["quantization"]
    lines = [
        f"model      {desc['path']}",
        f"size       {_size(desc['size_bytes'])} in {len(desc['files'])} files ({', '.join(desc['weights'])})",
        f"dtype      {desc['dtype']}" + (f", quantized {quant}" if quant else ", not quantized"),
        f"encoder    d={enc['d_model']} layers={enc['layers']} heads={enc['heads']} ffn={enc['ffn']} "
        f"window={enc['attention_window_s']:g} s",
        f"projector  {proj['layers']} linear layer(s){' after LayerNorm' if proj['layer_norm'] else ''}",
        f"llm        hidden={llm['hidden']} layers={llm['layers']} heads={llm['heads']}/{llm['kv_heads']} "
        f"head_dim={llm['head_dim']} vocab={llm['vocab']} rope_theta={llm['rope_theta']:g}",
        f"lm_head    {'stored' if desc['stored_lm_head'] else 'tied to embed_tokens'}",
        f"languages  {', '.join(desc['languages']) or 'not listed'}",
    ]
    return "\n".join(lines)
