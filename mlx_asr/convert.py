"""Convert an official Qwen3-ASR folder (or Hugging Face repo id) into an MLX model folder.

The output folder holds:

* ``model.safetensors`` (or ``model-0000N-of-0000M.safetensors`` + index past ``shard_bytes``): the
  official tensor names and layouts, floats in the chosen dtype; with quantization, each quantized
  module's ``weight`` is MLX's packed ``uint32`` array plus ``scales`` and ``biases`` (``mx.quantize``,
  affine). A tied ``thinker.lm_head.weight`` is dropped (``embed_tokens`` is the output head, as at
  inference).
* ``config.json``: the source config with the new ``dtype``, an mlx-lm style ``quantization`` block
  (see :mod:`mlx_asr.quantize`) and an ``mlx_asr`` block recording the source and every setting.
* the tokenizer files, with a generated ``tokenizer.json``, and the other small JSON files.
* ``README.md``: a model card with the source and settings.

Conversion streams: each tensor is read from the source file in row blocks, converted and written at
its place in the output file (the header is computed first), so peak memory is a few row blocks,
whatever the model size. The output is deterministic (same input and settings -> same bytes): tensor
order, header and JSON are canonical and nothing time- or machine-dependent is written. The folder is
written under a temporary name next to the destination and renamed when complete.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import __version__
from .checkpoint import LM_HEAD, open_checkpoint
from .errors import ModelError
from .quantize import QuantPolicy, quantization_block

DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_DTYPE = "bfloat16"
SHARD_BYTES = 5 * 1024**3
BLOCK_ELEMENTS = 1 << 22  # source elements per row block (16 MB of float32)
COPIED_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
)
# safetensors dtype -> (numpy storage type, bytes per element)
_STORAGE = {
    "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2), "F64": (np.float64, 8),
    "U32": (np.uint32, 4), "I32": (np.int32, 4), "I64": (np.int64, 8), "U8": (np.uint8, 1),
    "I8": (np.int8, 1), "BOOL": (np.bool_, 1), "U16": (np.uint16, 2), "I16": (np.int16, 2),
}
_FLOATS = ("F32", "F16", "BF16", "F64")
_TARGET = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source safetensors file: where its bytes are and what they hold."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of the output file: name, safetensors dtype, shape and bytes per source row."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _STORAGE[self.dtype][1]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * _STORAGE[self.dtype][1] if self.shape else self.nbytes


@dataclass(frozen=True)
class Job:
    """How one source tensor becomes output tensors: cast (``params`` None) or quantize."""

    source: SourceTensor
    module: str
    params: dict[str, Any] | None
    outputs: tuple[OutputTensor, ...]


@dataclass
class ConversionResult:
    """What a conversion wrote, for printing and tests."""

    output: Path
    source: str
    dtype: str
    policy: QuantPolicy | None
    summary: dict[str, str]
    tensors: int
    source_bytes: int
    weight_bytes: int
    quantized_modules: dict[int, int] = field(default_factory=dict)  # bits -> module count
    float_modules: list[str] = field(default_factory=list)  # quantizable modules kept float
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable report (the converter prints it)."""
        out = [f"source      {self.source}", f"output      {self.output}", f"dtype       {self.dtype}"]
        for family, setting in self.summary.items():
            out.append(f"{family:<36}{setting}")
        if self.quantized_modules:
            counts = ", ".join(f"{n} at {b} bit" for b, n in sorted(self.quantized_modules.items()))
            out.append(f"quantized modules   {counts}")
        if self.float_modules:
            shown = ", ".join(self.float_modules[:4]) + (" ..." if len(self.float_modules) > 4 else "")
            out.append(f"kept float          {len(self.float_modules)} quantizable module(s): {shown}")
        if self.dropped:
            out.append(f"dropped     {', '.join(self.dropped)}")
        out.append(
            f"weights     {_size(self.source_bytes)} -> {_size(self.weight_bytes)} ({self.tensors} tensors, "
            f"{self.seconds:.1f} s)"
        )
        return out


# ---------------------------------------------------------------------------------------------- reading
def read_header(path: Path) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file (header only)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    base = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _STORAGE:
            raise ModelError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        start, _ = info["data_offsets"]
        tensors[name] = SourceTensor(name, path, info["dtype"], tuple(info["shape"]), base + int(start))
    return tensors


def _read_rows(fh: BinaryIO, tensor: SourceTensor, first: int, count: int) -> np.ndarray:
    storage, size = _STORAGE[tensor.dtype]
    row = tensor.row_elements
    fh.seek(tensor.start + first * row * size)
    data = np.frombuffer(fh.read(count * row * size), dtype=storage)
    return data.reshape((count, *tensor.shape[1:]) if tensor.shape else ())


def _to_mx(data: np.ndarray, dtype: str):
    import mlx.core as mx

    array = mx.array(data)
    return array.view(mx.bfloat16) if dtype == "BF16" else array


def _to_bytes(array) -> bytes:
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array).tobytes()


# ---------------------------------------------------------------------------------------------- planning
def plan(
    tensors: dict[str, SourceTensor], dtype: str, policy: QuantPolicy | None, tied: bool
) -> tuple[list[Job], list[str]]:
    """The conversion jobs (sorted by tensor name) and the names dropped (a tied ``lm_head``)."""
    target = _TARGET[dtype]
    jobs, dropped = [], []
    for name in sorted(tensors):
        src = tensors[name]
        if tied and name == LM_HEAD:
            dropped.append(name)
            continue
        module = name.rsplit(".", 1)[0]
        params = None
        if policy is not None and name.endswith(".weight") and src.dtype in _FLOATS:
            params = policy.params_for(module, src.shape)
        if params is not None:
            rows, cols = src.shape
            packed = cols * params["bits"] // 32
            groups = cols // params["group_size"]
            outputs = (
                OutputTensor(name, "U32", (rows, packed)),
                OutputTensor(f"{module}.scales", target, (rows, groups)),
                OutputTensor(f"{module}.biases", target, (rows, groups)),
            )
        else:
            out_dtype = target if src.dtype in _FLOATS else src.dtype
            outputs = (OutputTensor(name, out_dtype, src.shape),)
        jobs.append(Job(src, module, params, outputs))
    return jobs, dropped


def _layout(outputs: list[OutputTensor], shard_bytes: int) -> list[list[OutputTensor]]:
    """Shards of output tensors in file order: 4-byte types first (aligned), then by name."""
    ordered = sorted(outputs, key=lambda t: (-_STORAGE[t.dtype][1], t.name))
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for tensor in ordered:
        if shards[-1] and used + tensor.nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards


def _header(tensors: list[OutputTensor]) -> tuple[bytes, dict[str, int]]:
    """Canonical safetensors header (padded to 8 bytes) and each tensor's data offset."""
    entries: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offsets, position = {}, 0
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [position, position + tensor.nbytes]
        }
        offsets[tensor.name] = position
        position += tensor.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


# ---------------------------------------------------------------------------------------------- converting
def _blocks(job: Job) -> Iterator[tuple[int, int]]:
    src = job.source
    step = max(1, BLOCK_ELEMENTS // max(src.row_elements, 1))
    for first in range(0, src.rows, step):
        yield first, min(step, src.rows - first)


def _convert_block(job: Job, data: np.ndarray, dtype: str) -> list[Any]:
    """The output arrays of one row block (``mx.array``), in the order of ``job.outputs``."""
    import mlx.core as mx

    src = job.source
    if src.dtype not in _FLOATS:
        return [mx.array(data)]
    target = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    array = _to_mx(data, src.dtype).astype(target)
    if dtype == "float16" and bool(mx.any(mx.isinf(array)).item()):
        raise ModelError(f"{src.name}: values beyond the float16 range; convert with --dtype bfloat16")
    if job.params is None:
        return [array]
    p = job.params
    return list(mx.quantize(array, group_size=p["group_size"], bits=p["bits"], mode=p["mode"]))


def _write_weights(
    folder: Path, jobs: list[Job], dtype: str, shard_bytes: int, progress: bool
) -> tuple[list[str], int]:
    """Write the weight file(s) of ``jobs``; return the file names and the bytes written."""
    import mlx.core as mx
    from tqdm import tqdm

    outputs = [t for job in jobs for t in job.outputs]
    shards = _layout(outputs, shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    place: dict[str, tuple[int, int]] = {}  # tensor -> (shard, absolute offset)
    handles = []
    try:
        for index, (name, tensors) in enumerate(zip(names, shards, strict=True)):
            header, offsets = _header(tensors)
            fh = (folder / name).open("wb")
            handles.append(fh)
            fh.write(header)
            fh.truncate(len(header) + sum(t.nbytes for t in tensors))
            for tensor in tensors:
                place[tensor.name] = (index, len(header) + offsets[tensor.name])
        total = sum(job.source.rows * job.source.row_elements * _STORAGE[job.source.dtype][1] for job in jobs)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress)
        with bar:
            sources: dict[Path, BinaryIO] = {}
            try:
                for job in jobs:
                    src = job.source
                    if src.path not in sources:
                        sources[src.path] = src.path.open("rb")
                    for first, count in _blocks(job):
                        arrays = _convert_block(job, _read_rows(sources[src.path], src, first, count), dtype)
                        mx.eval(arrays)
                        for tensor, array in zip(job.outputs, arrays, strict=True):
                            expected = (count, *tensor.shape[1:]) if tensor.shape else ()
                            if tuple(array.shape) != expected:
                                raise ModelError(f"{tensor.name}: converted to {array.shape}, planned {expected}")
                            shard, offset = place[tensor.name]
                            handles[shard].seek(offset + first * tensor.row_bytes)
                            handles[shard].write(_to_bytes(array))
                        del arrays
                        bar.update(count * src.row_elements * _STORAGE[src.dtype][1])
                    mx.clear_cache()
            finally:
                for fh in sources.values():
                    fh.close()
    finally:
        for fh in handles:
            fh.close()
    if len(shards) > 1:
        weight_map = {t.name: names[i] for i, tensors in enumerate(shards) for t in tensors}
        total_size = sum(t.nbytes for t in outputs)
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names, sum(t.nbytes for t in outputs)


# ---------------------------------------------------------------------------------------------- folder
def _source_label(source: str | Path, resolved: Path) -> str:
    """What the card and config call the source: the repo id, or the local folder's name (no machine path)."""
    text = str(source)
    return text if not Path(text).expanduser().exists() else resolved.resolve().name


def _write_config(folder: Path, raw: dict[str, Any], dtype: str, block: dict[str, Any] | None, info: dict) -> None:
    config = json.loads(json.dumps(raw))
    thinker = config.setdefault("thinker_config", {})
    thinker["dtype"] = dtype
    for section in (config, thinker):
        for key in ("dtype", "torch_dtype"):
            if key in section:
                section[key] = dtype
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if block is not None:
        config["quantization"] = block
    config["mlx_asr"] = info
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_tokenizer(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer and other small files; generate ``tokenizer.json`` when the source has none."""
    from .tokenizer import build_fast_tokenizer

    copied = []
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        build_fast_tokenizer(source).save(str(folder / "tokenizer.json"))
        copied.append("tokenizer.json (generated)")
    return copied


def _card(result: ConversionResult, files: list[str], command: str) -> str:
    name = result.output.name
    rows = "\n".join(f"| {family.replace('_', ' ')} | {setting} |" for family, setting in result.summary.items())
    return f"""# {name}

Qwen3-ASR speech recognition model in MLX format, converted by `mlx-asr` {__version__} from
`{result.source}`.

| setting | value |
|---|---|
| dtype | {result.dtype} |
{rows}
| weights | {_size(result.weight_bytes)} in {result.tensors} tensors (source: {_size(result.source_bytes)}) |

Made with:

```
{command}
```

Tensor names are the official ones (`thinker.audio_tower.*`, `thinker.model.*`); quantized modules store
MLX's packed `weight` with `scales` and `biases` (affine, `mx.quantize`), listed in `config.json`'s
`quantization` block; `config.json`'s `mlx_asr` block records the source and every setting.

## Use

```python
from mlx_asr import AsrPipeline

pipe = AsrPipeline.from_pretrained("{name}", backend="mlx")
print(pipe.transcribe("speech.wav"))
```

```
mlx-asr transcribe -m {name} -a speech.wav
```

On MLX's CPU backend (Linux), pass `--dtype float32` (`dtype="float32"`): its quantized and half-precision
matmuls are many times slower than float32 there. On Apple silicon keep the stored dtype.

Files: {", ".join(files)}.
"""


def _command(source_label: str, output: Path, dtype: str, policy: QuantPolicy | None) -> str:
    parts = ["mlx-asr convert", source_label, "-o", output.name, "--dtype", dtype]
    if policy is not None:
        def bits(value: int | None) -> str:
            return str(value) if value else "none"

        parts += ["--quantize", str(policy.bits), "--group-size", str(policy.group_size),
                  "--audio-bits", bits(policy.audio_bits), "--embed-bits", bits(policy.embed_bits)]
        if policy.head_bits != policy.embed_bits:
            parts += ["--head-bits", bits(policy.head_bits)]
    return " ".join(parts)


def _prepare_output(output: Path, source: Path, force: bool) -> Path:
    """Check the destination and return the temporary folder to write into."""
    if output.exists() or output.is_symlink():
        if not force:
            raise ModelError(f"{output}: already exists; pass --force to overwrite it")
        if not output.is_dir():
            raise ModelError(f"{output}: exists and is not a folder; remove it first")
        out, src = output.resolve(), source.resolve()
        if out == src or out in src.parents:
            raise ModelError(f"{output}: is (or contains) the source folder; choose another output")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    return partial


def convert(
    source: str | Path,
    output: str | Path,
    dtype: str = DEFAULT_DTYPE,
    policy: QuantPolicy | None = None,
    force: bool = False,
    progress: bool = True,
    shard_bytes: int = SHARD_BYTES,
    resolve: Callable[[str | Path], Path] | None = None,
) -> ConversionResult:
    """Convert ``source`` (official folder or Hugging Face repo id) into the MLX folder ``output``.

    Args:
        dtype: ``float16``, ``bfloat16`` or ``float32`` for every floating-point tensor (and the
            quantization scales/biases).
        policy: what to quantize at how many bits (:class:`~mlx_asr.quantize.QuantPolicy`); ``None``
            keeps every weight in ``dtype``.
        force: replace an existing ``output`` folder.
        progress: show a tqdm progress bar (stderr).
        shard_bytes: largest weight file before the weights are split into shards.
        resolve: turns ``source`` into a local folder (default: the pipeline's, which fetches repo ids).

    Raises:
        ModelError: the source is not a Qwen3-ASR checkpoint, is already quantized, or the output exists.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if resolve is None:
        from .pipeline import _resolve_model_path as resolve
    folder = resolve(source)
    checkpoint = open_checkpoint(folder)
    if checkpoint.is_quantized:
        raise ModelError(f"{source}: already quantized; convert from the official (or a float) folder")
    output = Path(output)
    tensors: dict[str, SourceTensor] = {}
    for path in checkpoint.files:
        tensors.update(read_header(path))
    tied = checkpoint.config.text.tie_word_embeddings
    jobs, dropped = plan(tensors, dtype, policy, tied)
    partial = _prepare_output(output, checkpoint.path, force)
    try:
        weight_files, weight_bytes = _write_weights(partial, jobs, dtype, shard_bytes, progress)
        copied = _copy_tokenizer(checkpoint.path, partial)
        label = _source_label(source, checkpoint.path)
        quantizable = {job.module: job.params for job in jobs if _quantizable(job, policy)}
        block = quantization_block(policy, quantizable) if policy is not None else None
        summary = policy.summary(tied) if policy is not None else {"quantization": "none"}
        if policy is None and tied:
            summary["lm_head"] = "tied to embed_tokens (not stored)"
        bits_count: dict[int, int] = {}
        for params in quantizable.values():
            if params is not None:
                bits_count[params["bits"]] = bits_count.get(params["bits"], 0) + 1
        result = ConversionResult(
            output=output,
            source=label,
            dtype=dtype,
            policy=policy,
            summary=summary,
            tensors=sum(len(job.outputs) for job in jobs),
            source_bytes=sum(p.stat().st_size for p in checkpoint.files),
            weight_bytes=weight_bytes,
            quantized_modules=bits_count,
            float_modules=sorted(m for m, p in quantizable.items() if p is None and policy is not None
                                 and policy.bits_for(m) is not None),
            dropped=dropped,
        )
        command = _command(label, output, dtype, policy)
        info = {
            "format": "mlx",
            "format_version": 1,
            "converter": f"mlx-asr {__version__}",
            "source": label,
            "dtype": dtype,
            "quantization": policy.describe() if policy is not None else None,
            "policy": summary,
            "dropped": dropped,
            "command": command,
        }
        _write_config(partial, checkpoint.config.raw, dtype, block, info)
        files = sorted(weight_files + [n.split(" ")[0] for n in copied] + ["config.json", "README.md"])
        (partial / "README.md").write_text(_card(result, files, command), encoding="utf-8")
        open_checkpoint(partial)  # the result must validate like any model folder
        if output.exists():
            shutil.rmtree(output)
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - start
    return result


def _quantizable(job: Job, policy: QuantPolicy | None) -> bool:
    """Whether ``job`` is a module weight the policy has an opinion on (quantized or deliberately float)."""
    if policy is None or not job.source.name.endswith(".weight"):
        return False
    return job.params is not None or policy.bits_for(job.module) is not None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
