#!/usr/bin/env python3
"""Build a random-weight Qwen3-ASR checkpoint with the real 0.6B or 1.7B shapes, for benchmarks only.

The folder has the official on-disk layout: ``config.json`` (the same keys as
``tests/fixtures/tiny/config.json``, with the real dimensions), ``generation_config.json``,
``preprocessor_config.json``, ``chat_template.json``, the tokenizer files (the real Qwen tokenizer,
copied from ``tests/fixtures/tiny``) and bf16 safetensors weights named as the official file
(``thinker.audio_tower.*``, ``thinker.model.*`` and an explicit ``thinker.lm_head.weight`` equal to
``thinker.model.embed_tokens.weight``). The 1.7B model is written in two shards with an index, like the
official repository; the 0.6B model is one ``model.safetensors``.

Weights follow the default Hugging Face init: linear, conv and embedding weights ~ N(0, 0.02^2), biases 0,
LayerNorm/RMSNorm weights 1 (LayerNorm biases 0), so activations stay finite. Each tensor has its own
generator seeded from ``--seed`` and its name, so a build is reproducible and the lm_head copy equals the
embedding without keeping either in memory. Tensors are generated and written one at a time (large ones
in row blocks), so peak RAM stays around 100 MB whatever the model size.

Needs only numpy, torch and the standard library (no transformers, no qwen-asr).

    python benchmarks/make_checkpoint.py --size 0.6b --out benchmarks/models/0.6b-random
    python benchmarks/make_checkpoint.py --size 1.7b --out benchmarks/models/1.7b-random

Never commit the output (``benchmarks/models/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "tests" / "fixtures" / "tiny"
COPIED_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
)

# Real dimensions (docs: qwen3-asr-spec.md section 1.2; the official 0.6B config dict of the reference
# build_checkpoint.py). Keys not listed here keep the tiny fixture's values, which are the real ones
# (n_window 50, n_window_infer 800, vocab 151936, head_dim 128, rope_theta 1e6, ...).
SIZES = {
    "0.6b": {
        "audio": dict(
            d_model=896,
            encoder_layers=18,
            num_hidden_layers=18,
            encoder_attention_heads=14,
            encoder_ffn_dim=3584,
            downsample_hidden_size=480,
            output_dim=1024,
        ),
        "text": dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        ),
        "shards": 1,
    },
    "1.7b": {
        "audio": dict(
            d_model=1024,
            encoder_layers=24,
            num_hidden_layers=24,
            encoder_attention_heads=16,
            encoder_ffn_dim=4096,
            downsample_hidden_size=480,
            output_dim=2048,
        ),
        "text": dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        ),
        "shards": 2,
    },
}
STD = 0.02
BLOCK_ELEMENTS = 1 << 24  # values generated at once (64 MB of float32)


def make_config(size: str) -> dict:
    """The tiny fixture's config.json with the real dimensions of ``size`` and bf16 dtype."""
    config = json.loads((TEMPLATE / "config.json").read_text(encoding="utf-8"))
    config = copy.deepcopy(config)
    thinker = config["thinker_config"]
    for key, value in SIZES[size]["audio"].items():
        assert key in thinker["audio_config"], key
        thinker["audio_config"][key] = value
    for key, value in SIZES[size]["text"].items():
        assert key in thinker["text_config"], key
        thinker["text_config"][key] = value
    config["dtype"] = "bfloat16"
    thinker["dtype"] = "bfloat16"
    return config


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, init)`` of every tensor in the official checkpoint; init is normal, zeros or ones."""
    a = config["thinker_config"]["audio_config"]
    t = config["thinker_config"]["text_config"]
    d, ffn, c, out = a["d_model"], a["encoder_ffn_dim"], a["downsample_hidden_size"], a["output_dim"]
    freq = a["num_mel_bins"]
    for _ in range(3):
        freq = (freq - 1) // 2 + 1
    specs: list[tuple[str, tuple[int, ...], str]] = []
    p = "thinker.audio_tower."
    for i, cin in ((1, 1), (2, c), (3, c)):
        specs += [(f"{p}conv2d{i}.weight", (c, cin, 3, 3), "normal"), (f"{p}conv2d{i}.bias", (c,), "zeros")]
    specs.append((f"{p}conv_out.weight", (d, c * freq), "normal"))
    for i in range(a["encoder_layers"]):
        q = f"{p}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(f"{q}self_attn.{proj}.weight", (d, d), "normal"), (f"{q}self_attn.{proj}.bias", (d,), "zeros")]
        specs += [(f"{q}self_attn_layer_norm.weight", (d,), "ones"), (f"{q}self_attn_layer_norm.bias", (d,), "zeros")]
        specs += [(f"{q}fc1.weight", (ffn, d), "normal"), (f"{q}fc1.bias", (ffn,), "zeros")]
        specs += [(f"{q}fc2.weight", (d, ffn), "normal"), (f"{q}fc2.bias", (d,), "zeros")]
        specs += [(f"{q}final_layer_norm.weight", (d,), "ones"), (f"{q}final_layer_norm.bias", (d,), "zeros")]
    specs += [(f"{p}ln_post.weight", (d,), "ones"), (f"{p}ln_post.bias", (d,), "zeros")]
    specs += [(f"{p}proj1.weight", (d, d), "normal"), (f"{p}proj1.bias", (d,), "zeros")]
    specs += [(f"{p}proj2.weight", (out, d), "normal"), (f"{p}proj2.bias", (out,), "zeros")]

    h, inter, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    qd, kvd = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    m = "thinker.model."
    specs.append((f"{m}embed_tokens.weight", (t["vocab_size"], h), "normal"))
    for j in range(t["num_hidden_layers"]):
        q = f"{m}layers.{j}."
        specs += [
            (f"{q}input_layernorm.weight", (h,), "ones"),
            (f"{q}self_attn.q_proj.weight", (qd, h), "normal"),
            (f"{q}self_attn.k_proj.weight", (kvd, h), "normal"),
            (f"{q}self_attn.v_proj.weight", (kvd, h), "normal"),
            (f"{q}self_attn.o_proj.weight", (h, qd), "normal"),
            (f"{q}self_attn.q_norm.weight", (hd,), "ones"),
            (f"{q}self_attn.k_norm.weight", (hd,), "ones"),
            (f"{q}post_attention_layernorm.weight", (h,), "ones"),
            (f"{q}mlp.gate_proj.weight", (inter, h), "normal"),
            (f"{q}mlp.up_proj.weight", (inter, h), "normal"),
            (f"{q}mlp.down_proj.weight", (h, inter), "normal"),
        ]
    specs.append((f"{m}norm.weight", (h,), "ones"))
    specs.append(("thinker.lm_head.weight", (t["vocab_size"], h), "normal"))
    return specs


def _seed_name(name: str) -> str:
    """The lm_head copies the embedding (tied, as the official file stores it)."""
    return "thinker.model.embed_tokens.weight" if name == "thinker.lm_head.weight" else name


def tensor_blocks(name: str, shape: tuple[int, ...], init: str, seed: int):
    """bf16 bytes of one tensor, yielded in row blocks."""
    numel = 1
    for s in shape:
        numel *= s
    if init != "normal":
        value = 1.0 if init == "ones" else 0.0
        yield torch.full((numel,), value, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
        return
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(_seed_name(name).encode())) % (1 << 63))
    row = numel // shape[0]
    rows = max(1, BLOCK_ELEMENTS // row)
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        block = torch.randn(n * row, generator=gen).mul_(STD).to(torch.bfloat16)
        yield block.view(torch.int16).numpy().tobytes()


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], str]], seed: int) -> int:
    """Write one safetensors file tensor by tensor; returns its data bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        nbytes = 2
        for s in shape:
            nbytes *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data start, as safetensors writes it
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape, init in specs:
            for chunk in tensor_blocks(name, shape, init, seed):
                fh.write(chunk)
    return offset


def build(size: str, out: Path, seed: int, force: bool = False) -> None:
    if out.exists():
        if not force and any(out.iterdir()):
            raise SystemExit(f"{out} exists and is not empty (pass --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = make_config(size)
    specs = tensor_specs(config)
    params = sum(_numel(s) for n, s, _ in specs if n != "thinker.lm_head.weight")
    audio = sum(_numel(s) for n, s, _ in specs if n.startswith("thinker.audio_tower."))
    print(
        f"{size}: {len(specs)} tensors, {params / 1e6:.1f} M parameters (audio tower {audio / 1e6:.1f} M, "
        f"LLM {(params - audio) / 1e6:.1f} M) + lm_head copy",
        flush=True,
    )

    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        shutil.copy(TEMPLATE / name, out / name)

    start = time.perf_counter()
    shards = SIZES[size]["shards"]
    if shards == 1:
        total = write_safetensors(out / "model.safetensors", specs, seed)
    else:
        # split in tensor order into shards of about equal size, with an index (official layout)
        sizes = [2 * _numel(s) for _, s, _ in specs]
        target = sum(sizes) / shards
        groups: list[list[int]] = [[]]
        acc = 0.0
        for i, nbytes in enumerate(sizes):
            if acc >= target * len(groups) and len(groups) < shards:
                groups.append([])
            groups[-1].append(i)
            acc += nbytes
        weight_map, total = {}, 0
        for k, group in enumerate(groups, 1):
            fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            total += write_safetensors(out / fname, [specs[i] for i in group], seed)
            weight_map.update({specs[i][0]: fname for i in group})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {total / 1e9:.2f} GB of bf16 weights in {time.perf_counter() - start:.1f} s to {out}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    build(args.size, args.out, args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
