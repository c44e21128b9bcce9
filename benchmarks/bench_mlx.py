#!/usr/bin/env python3
"""MLX backend benchmarks: quantization accuracy, memory, and the decode step next to the MLX peers.

    python benchmarks/bench_mlx.py accuracy [--trained] [--json out.json]
    python benchmarks/bench_mlx.py memory --model benchmarks/models/1.7b-random --bits 4
    python benchmarks/bench_mlx.py decode --model F32_FOLDER --peer-python /tmp/venv-peer/bin/python

``accuracy`` (tiny fixture, float32 compute): converts ``tests/fixtures/tiny`` at 8 and 4 bit (group 32, the
default policy otherwise) and compares with the official float32 reference dumps: the first-step logits'
cosine, the free-running greedy tokens (identical or first divergence, 40 tokens) and teacher-forced
agreement (the model fed the reference tokens, argmax compared step by step), with the reference's
top-1/top-2 logit margin at each disagreement. ``accuracy --trained`` does the same on the fine-tuned tiny
checkpoint (``tests/fixtures/trained``, whose choices win by wide margins, as a trained model's do), with
our float32 MLX run of it as the reference.

``memory``: converts a (random, official-layout) checkpoint in a child process and reports that process's
peak RSS, then loads the converted folder with ``AsrPipeline`` in a fresh child process and transcribes a
clip (``max_new_tokens`` decoded) and reports its peak RSS (``ru_maxrss``: everything the process touched,
Python, MLX, the tokenizer and the weights) and MLX's own peak.

``decode``: the same float32 folder decoded by three systems, each in its own child process:
``mlx-asr`` (this package), ``mlx-lm`` (its Qwen3 model and ``generate_step`` on the same LLM weights) and
``mlx-qwen3-asr`` (PyPI; run with ``--peer-python``, a separate venv). For each: wall-clock per decoded
token (median of the intervals between consecutive tokens), and per decoded token the number of graph
operations and of evaluations. Method: ``mx.eval``, ``mx.async_eval``, ``array.item``, ``array.tolist``
and ``mx.synchronize`` are wrapped; each call is counted, and the graph it launches (every not yet
evaluated array reachable from its arguments) is written with ``mx.export_to_dot`` and its primitive
nodes are counted by name. Graphs are detached once evaluated, so nothing is counted twice. Per-token
numbers are the difference between a run of ``2k`` and of ``k`` tokens divided by ``k`` (prefill cancels).
"Operations" counts every primitive node; "kernels" leaves out nodes that launch no work on contiguous
data (reshape, transpose, slice, split, broadcast, squeeze, expand-dims, flatten, unflatten, depends).
``Compiled*`` nodes are fused ``mx.compile`` kernels; ``RMSNorm``/``RoPE``/``ScaledDotProductAttention`` are
``mx.fast`` kernels; ``QuantizedMatmul`` is a quantized matmul. MLX's CPU backend expands the ``mx.fast``
functions into many primitives, so the graphs are counted twice: as built here ("CPU graph") and with
one-node stand-ins for the ``mx.fast`` calls ("Metal-equivalent", one node each as on a Metal stream;
see ``GraphProbe``). Timing uses the real kernels. Preload OpenBLAS on Linux for timing (the ``decode``
command does it for its children when the library is installed).

Only the standard library and numpy are imported at module level, so the peer venv can run the
``_decode-peer`` child.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny"
AUDIO = ROOT / "tests" / "fixtures" / "audio"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
VIEWS = {"Reshape", "Transpose", "Slice", "Broadcast", "Squeeze", "ExpandDims", "AsStrided", "Split", "Flatten",
         "Unflatten", "Depends"}
FAST = {"RMSNorm", "LayerNorm", "RoPE", "ScaledDotProductAttention"}


# ---------------------------------------------------------------------------------------------- graph probe
MARKERS = {"CumMax": "RMSNorm", "CumMin": "LayerNorm", "CumProd": "RoPE", "CumSum": "ScaledDotProductAttention"}


class GraphProbe:
    """Counts evaluation calls and, per call, the primitive nodes of the graph it evaluates.

    ``metal=True`` swaps the ``mx.fast`` functions for one-node stand-ins while the graphs are built (their
    results are then wrong; the probe only counts): MLX's CPU backend expands ``rms_norm``, ``rope`` and
    ``scaled_dot_product_attention`` into 10-30 primitives each, while on a Metal stream each is a single
    kernel. The stand-ins are non-elementwise one-node ops (``cummax``, ``cummin``, ``cumprod``, ``cumsum``,
    so ``mx.compile`` neither removes nor fuses them, as with the real kernels), with ``mx.depends`` on the
    other array inputs so everything upstream (cache updates) stays in the graph; the census renames them.
    """

    def __init__(self, metal: bool = False) -> None:
        self.metal = metal
        self.calls: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self._saved: list[tuple[object, str, object]] = []

    @staticmethod
    def census(arrays) -> Counter[str]:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        flat = [a for _, a in tree_flatten(arrays) if isinstance(a, mx.array)]
        if not flat:
            return Counter()
        buf = io.StringIO()
        mx.export_to_dot(buf, *flat)
        names = re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue())
        return Counter("Compiled" if n.startswith("Compiled") else MARKERS.get(n, n) for n in names)

    def _patch(self, owner, name: str, replacement) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def _counted(self, owner, name: str, kind: str) -> None:
        original = getattr(owner, name)
        probe = self

        def wrapper(*args, **kwargs):
            probe.calls[kind] += 1
            probe.ops.update(probe.census(list(args)))
            return original(*args, **kwargs)

        self._patch(owner, name, wrapper)

    def _fast_stand_ins(self) -> None:
        import mlx.core as mx

        def tie(out, *inputs):
            deps = [a for a in inputs if isinstance(a, mx.array)]
            return mx.depends([out], deps)[0] if deps else out

        def rms_norm(x, weight=None, eps=1e-5, **_):
            return tie(mx.cummax(x, axis=-1), weight)

        def layer_norm(x, weight=None, bias=None, eps=1e-5, **_):
            return tie(mx.cummin(x, axis=-1), weight, bias)

        def rope(x, dims, *, offset=0, **_):
            return tie(mx.cumprod(x, axis=-1), offset)

        def sdpa(q, k, v, *, scale=1.0, mask=None, **_):
            return tie(mx.cumsum(q, axis=-1), k, v, mask)

        for name, fn in (("rms_norm", rms_norm), ("layer_norm", layer_norm), ("rope", rope),
                         ("scaled_dot_product_attention", sdpa)):
            self._patch(mx.fast, name, fn)

    def __enter__(self) -> GraphProbe:
        import mlx.core as mx

        if self.metal:
            self._fast_stand_ins()
        self._counted(mx, "eval", "eval")
        self._counted(mx, "async_eval", "async_eval")
        self._counted(mx, "synchronize", "synchronize")
        self._counted(mx.array, "item", "item")
        self._counted(mx.array, "tolist", "tolist")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "ops": dict(self.ops)}


def per_token(short: dict, long: dict, tokens: int) -> dict:
    """Per-token counts from probes of a ``k``- and a ``2k``-token run."""
    def diff(key):
        names = set(short[key]) | set(long[key])
        return {n: (long[key].get(n, 0) - short[key].get(n, 0)) / tokens for n in sorted(names)}

    calls, ops = diff("calls"), diff("ops")
    total = sum(ops.values())
    return {
        "evaluations": calls,
        "evaluations_total": sum(calls.values()),
        "blocking_evaluations": sum(v for k, v in calls.items() if k != "async_eval"),
        "ops": {k: v for k, v in ops.items() if v},
        "ops_total": total,
        "kernels_total": total - sum(v for k, v in ops.items() if k in VIEWS),
        "compiled_nodes": ops.get("Compiled", 0),
        "fast_kernels": sum(v for k, v in ops.items() if k in FAST),
        "quantized_matmuls": ops.get("QuantizedMatmul", 0),
        "matmuls": ops.get("Matmul", 0),
    }


def _interval_stats(stamps: list[tuple[float, float]]) -> dict:
    """Per-token wall-clock and process CPU time (all threads) from ``(perf_counter, process_time)`` stamps."""
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "tokens": len(stamps),
        "s_per_token_median": statistics.median(gaps) if gaps else None,
        "s_per_token_mean": statistics.fmean(gaps) if gaps else None,
        "intervals": [round(g, 4) for g in gaps],
        "cpu_intervals": [round(g, 4) for g in cpu],
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- decode children
def _read_clip(path: str):
    import numpy as np
    import soundfile as sf

    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != 16000:
        raise SystemExit(f"{path}: needs a 16 kHz clip")
    return np.ascontiguousarray(samples.mean(axis=1))


def _decode_ours(args) -> dict:
    """mlx-asr's MlxBackend.generate (no stop tokens, so exactly ``tokens`` steps)."""
    import mlx.core as mx

    from mlx_asr.backends.mlx import MlxBackend
    from mlx_asr.backends.mlx.llm import Decoder
    from mlx_asr.checkpoint import open_checkpoint
    from mlx_asr.config import num_audio_tokens
    from mlx_asr.mel import num_frames
    from mlx_asr.prompt import build_prompt_ids
    from mlx_asr.tokenizer import QwenTokenizer

    checkpoint = open_checkpoint(args.model)
    backend = MlxBackend(checkpoint, args.dtype, "cpu")
    if args.pipelined is not None:
        backend.decoder.pipelined = args.pipelined == "yes"
    samples = _read_clip(args.audio)
    n_audio = num_audio_tokens(num_frames(samples.shape[0]), checkpoint.config.audio.chunk_frames)
    prompt = build_prompt_ids(QwenTokenizer.from_dir(checkpoint.path), n_audio, checkpoint.config.audio_token_id)
    embeds = backend.encode(backend.log_mel(samples))
    mx.eval(embeds)

    def run(n: int) -> list[tuple[float, float]]:
        stamps = []
        for _ in backend.generate(prompt, embeds, n, stop_ids=[]):
            stamps.append((time.perf_counter(), time.process_time()))
        return stamps

    def fresh() -> None:
        decoder = backend.decoder
        backend.decoder = Decoder(decoder.model, decoder.head, decoder.prefill_step, decoder.pipelined)

    return _measure(run, args, prompt_len=len(prompt), fresh=fresh)


def _decode_mlxlm(args) -> dict:
    """mlx-lm's Qwen3 model and ``generate_step`` with the checkpoint's LLM weights (same prompt length)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.qwen3 import Model, ModelArgs

    config = json.loads((Path(args.model) / "config.json").read_text())["thinker_config"]["text_config"]
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[args.dtype]
    model_args = ModelArgs(
        model_type="qwen3", hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"],
        intermediate_size=config["intermediate_size"], num_attention_heads=config["num_attention_heads"],
        rms_norm_eps=config["rms_norm_eps"], vocab_size=config["vocab_size"],
        num_key_value_heads=config["num_key_value_heads"], max_position_embeddings=config["max_position_embeddings"],
        head_dim=config["head_dim"], tie_word_embeddings=True, rope_theta=config["rope_theta"],
    )
    model = Model(model_args)
    weights = {}
    for path in sorted(Path(args.model).glob("*.safetensors")):
        for name, value in mx.load(str(path)).items():
            if name.startswith("thinker.model."):
                weights["model." + name[len("thinker.model."):]] = value.astype(dtype)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    mx.eval(model.parameters())
    prompt = mx.array([(i * 7919) % 150000 for i in range(args.prompt_len)], dtype=mx.int32)

    def run(n: int) -> list[tuple[float, float]]:
        stamps = []
        for _ in generate_step(prompt, model, max_tokens=n):
            stamps.append((time.perf_counter(), time.process_time()))
        return stamps

    return _measure(run, args, prompt_len=args.prompt_len)


def _decode_peer(args) -> dict:
    """mlx-qwen3-asr's own ``generate_with_info`` loop (EOS and repetition stops disabled)."""
    import mlx.core as mx
    from mlx_qwen3_asr import generate as peer_generate
    from mlx_qwen3_asr.audio import compute_features
    from mlx_qwen3_asr.load_models import load_model

    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[args.dtype]
    model, _ = load_model(args.model, dtype=dtype)
    samples = _read_clip(args.audio)
    mel, lens = compute_features(samples)
    features, _ = model.audio_tower(mel.astype(dtype), lens)
    mx.eval(features)
    prompt = json.loads(args.prompt_ids)
    if sum(1 for t in prompt if t == model.audio_token_id) != features.shape[1]:
        raise SystemExit("peer: audio token count differs from its encoder's output")
    input_ids = mx.array([prompt])
    positions = mx.arange(len(prompt))[None, :]
    position_ids = mx.stack([positions, positions, positions], axis=1)
    peer_generate._detect_repetition = lambda tokens, threshold=20: False
    step = model.step
    stamps: list[tuple[float, float]] = []

    def timed_step(*a, **k):
        stamps.append((time.perf_counter(), time.process_time()))
        return step(*a, **k)

    model.step = timed_step

    def run(n: int) -> list[tuple[float, float]]:
        stamps.clear()
        config = peer_generate.GenerationConfig(max_new_tokens=n, eos_token_ids=[])
        peer_generate.generate_with_info(model, input_ids, features, position_ids, config)
        return list(stamps)

    return _measure(run, args, prompt_len=len(prompt))


def _measure(run, args, prompt_len: int, fresh=None) -> dict:
    """Warm up; probe ``k``- and ``2k``-token runs (CPU graph, then Metal-equivalent graph); time the runs.

    ``fresh()`` is called before each probed run so that compiled functions are traced again under the
    probe's stand-ins (a compiled function keeps the graph of its first trace).
    """
    k = args.probe_tokens
    run(3)
    counts = {}
    for label, metal in (("cpu_graph", False), ("metal_graph", True)) if k else ():
        snapshots = []
        for n in (k, 2 * k):
            if fresh is not None:
                fresh()
            with GraphProbe(metal=metal) as probe:
                run(n)
            snapshots.append(probe.snapshot())
        counts[label] = per_token(snapshots[0], snapshots[1], k)
    if fresh is not None:
        fresh()
    run(3)
    timings = [_interval_stats(run(args.tokens)) for _ in range(args.repeats)]
    gaps = [g for t in timings for g in t["intervals"]]
    return {
        "prompt_len": prompt_len,
        "per_token": counts,
        "cpu_s_per_token_median": statistics.median(g for t in timings for g in t["cpu_intervals"]),
        "s_per_token_median": statistics.median(gaps),
        "s_per_token_mean": statistics.fmean(gaps),
        "runs": timings,
        "peak_rss_mb": _peak_rss_mb(),
    }


def cmd_decode(args) -> None:
    """Run each system in a child process (OpenBLAS preloaded when present) and print a table."""
    from mlx_asr.checkpoint import open_checkpoint
    from mlx_asr.config import num_audio_tokens
    from mlx_asr.mel import num_frames
    from mlx_asr.prompt import build_prompt_ids
    from mlx_asr.tokenizer import QwenTokenizer

    checkpoint = open_checkpoint(args.model)
    import soundfile as sf

    samples = sf.read(args.audio, dtype="float32")[0]
    n_audio = num_audio_tokens(num_frames(samples.shape[0]), checkpoint.config.audio.chunk_frames)
    prompt = build_prompt_ids(QwenTokenizer.from_dir(checkpoint.path), n_audio, checkpoint.config.audio_token_id)
    env = dict(os.environ)
    if os.path.exists(OPENBLAS) and not args.no_openblas:
        env["LD_PRELOAD"] = OPENBLAS
    common = ["--model", str(args.model), "--audio", str(args.audio), "--dtype", args.dtype,
              "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--probe-tokens", str(args.probe_tokens)]
    systems = {
        "mlx-asr": [sys.executable, __file__, "_decode-ours", *common],
        "mlx-lm": [sys.executable, __file__, "_decode-mlxlm", *common, "--prompt-len", str(len(prompt))],
    }
    if args.pipelined_too:
        systems["mlx-asr (pipelined)"] = [*systems["mlx-asr"], "--pipelined", "yes"]
    if args.peer_python:
        systems["mlx-qwen3-asr"] = [args.peer_python, __file__, "_decode-peer", *common,
                                    "--prompt-ids", json.dumps(prompt)]
    results: dict[str, list[dict]] = {name: [] for name in systems}
    names = list(systems)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # rotate the order
            print(f"[round {round_ + 1}/{args.rounds}] {name} ...", file=sys.stderr, flush=True)
            command = list(systems[name])
            if round_:  # the counts are deterministic: probe in the first round only
                command[command.index("--probe-tokens") + 1] = "0"
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    keys = ("ops_total", "kernels_total", "evaluations_total", "blocking_evaluations", "compiled_nodes",
            "fast_kernels", "quantized_matmuls", "matmuls", "evaluations", "ops")
    for name, runs in results.items():
        gaps = [g for r in runs for t in r["runs"] for g in t["intervals"]]
        per_round = [r["s_per_token_median"] for r in runs]
        cpu_rounds = [r["cpu_s_per_token_median"] for r in runs]
        rows.append({
            "system": name,
            "cpu_s_per_token_median": statistics.median(cpu_rounds),
            "cpu_s_per_token_per_round": [round(t, 3) for t in cpu_rounds],
            "s_per_token_median": statistics.median(gaps),
            "s_per_token_best_round": min(per_round),
            "s_per_token_per_round": [round(t, 3) for t in per_round],
            "cpu_graph": {k: runs[0]["per_token"]["cpu_graph"][k] for k in keys},
            "metal_graph": {k: runs[0]["per_token"]["metal_graph"][k] for k in keys},
            "prompt_len": runs[0]["prompt_len"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        })
    report = {"model": str(args.model), "dtype": args.dtype, "tokens": args.tokens, "openblas": "LD_PRELOAD" in env,
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("| system | s/token (median, all) | best round | per round | Metal-equiv. ops/token (kernels) | "
          "CPU-graph ops/token (kernels) | evaluations/token (blocking) | compiled nodes | mx.fast kernels | "
          "quantized matmuls | matmuls |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, c = r["metal_graph"], r["cpu_graph"]
        print(f"| {r['system']} | {r['s_per_token_median']:.3f} | {r['s_per_token_best_round']:.3f} | "
              f"{r['s_per_token_per_round']} | "
              f"{m['ops_total']:.0f} ({m['kernels_total']:.0f}) | {c['ops_total']:.0f} ({c['kernels_total']:.0f}) | "
              f"{m['evaluations_total']:.2f} ({m['blocking_evaluations']:.2f}) | {m['compiled_nodes']:.0f} | "
              f"{m['fast_kernels']:.0f} | {m['quantized_matmuls']:.0f} | {m['matmuls']:.0f} |")
    print("\nProcess CPU seconds per token (all threads; less sensitive to other processes than wall-clock):")
    for r in rows:
        print(f"  {r['system']}: median {r['cpu_s_per_token_median']:.3f}, per round {r['cpu_s_per_token_per_round']}")
    ours = rows[0]["s_per_token_per_round"]
    for r in rows[1:]:
        ratios = [round(t / o, 2) for t, o in zip(r["s_per_token_per_round"], ours, strict=True)]
        print(f"{r['system']} / {rows[0]['system']} per round (same round, so the same machine load): {ratios}")
    for r in rows:
        print(f"{r['system']}: evaluations {r['metal_graph']['evaluations']}; Metal-equivalent ops "
              f"{r['metal_graph']['ops']}")


# ---------------------------------------------------------------------------------------------- accuracy
def _float_reference(folder: Path, cases: list[str]) -> dict[str, tuple]:
    """Our float32 MLX run of ``folder`` as the reference: per case (first logits, tokens, margins)."""
    import mlx.core as mx
    import numpy as np
    from conftest import get_case

    from mlx_asr.audio import load_audio
    from mlx_asr.backends.mlx import MlxBackend
    from mlx_asr.checkpoint import open_checkpoint

    backend = MlxBackend(open_checkpoint(folder), "float32", "cpu")
    out = {}
    for tag in cases:
        case = get_case(tag)
        prompt = case.tensors["prompt_ids"].tolist()
        embeds = backend.encode(backend.log_mel(load_audio(case.audio)))
        tokens = [s.token for s in backend.generate(prompt, embeds, 40, STOP_IDS)]
        hidden = backend.decoder.model(input_embeddings=backend.embed_prompt(prompt + tokens[:-1], embeds)[None])
        top2 = np.sort(np.array(backend.decoder.logits(hidden[0, len(prompt) - 1:]).astype(mx.float32)), axis=-1)
        out[tag] = backend.first_logits(prompt, embeds), tokens, (top2[:, -1] - top2[:, -2]).tolist()
    return out


def cmd_accuracy(args) -> None:
    """Quantized tiny fixture vs the official float32 reference, or (``--trained``) the fine-tuned tiny
    checkpoint vs our own float32 run of it (see the module docstring)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import mlx.core as mx
    import numpy as np
    from conftest import CASES, build_trained_checkpoint, get_case

    from mlx_asr.audio import load_audio
    from mlx_asr.backends.mlx import MlxBackend
    from mlx_asr.checkpoint import open_checkpoint
    from mlx_asr.convert import convert
    from mlx_asr.quantize import QuantPolicy

    variants = {
        "8-bit": QuantPolicy.create(8, 32),
        "4-bit": QuantPolicy.create(4, 32),
        "8-bit, float embeddings": QuantPolicy.create(8, 32, embed_bits="none"),
        "4-bit, float embeddings": QuantPolicy.create(4, 32, embed_bits="none"),
        "4-bit, 4-bit embeddings": QuantPolicy.create(4, 32, embed_bits=4),
        "4-bit, float audio encoder": QuantPolicy.create(4, 32, audio_bits="none"),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    report: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.trained:
            source = build_trained_checkpoint(Path(tmp) / "trained")
            references = _float_reference(source, CASES)
        else:
            source = TINY
            references = {
                tag: (get_case(tag).tensors["logits_step0"], get_case(tag).generated_ids,
                      get_case(tag).meta["step_top1_top2_margin"])
                for tag in CASES
            }
        for name, policy in variants.items():
            folder = Path(tmp) / name.replace(" ", "_").replace(",", "")
            convert(source, folder, dtype="float32", policy=policy, progress=False)
            backend = MlxBackend(open_checkpoint(folder), "float32", "cpu")
            rows = []
            for tag in CASES:
                case = get_case(tag)
                expected, reference, margins = references[tag]
                prompt = case.tensors["prompt_ids"].tolist()
                embeds = backend.encode(backend.log_mel(load_audio(case.audio)))
                logits = backend.first_logits(prompt, embeds)
                cosine = float(logits @ expected / (np.linalg.norm(logits) * np.linalg.norm(expected)))
                tokens = [s.token for s in backend.generate(prompt, embeds, len(reference), STOP_IDS)]
                diverge = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), None)
                full = backend.embed_prompt(prompt + reference[:-1], embeds)
                hidden = backend.decoder.model(input_embeddings=full[None])[0, len(prompt) - 1:]
                forced = np.array(mx.argmax(backend.decoder.logits(hidden), axis=-1)).tolist()
                wrong = [i for i, (a, b) in enumerate(zip(forced, reference, strict=True)) if a != b]
                rows.append({
                    "clip": tag, "cosine": cosine, "identical": tokens == reference, "first_divergence": diverge,
                    "margin_at_divergence": margins[diverge] if diverge is not None else None,
                    "teacher_forced": f"{len(reference) - len(wrong)}/{len(reference)}",
                    "teacher_forced_wrong_margins": [round(margins[i], 3) for i in wrong],
                    "smallest_reference_margin": round(min(margins), 3),
                })
            report[name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, rows in report.items():
        same = sum(r["identical"] for r in rows)
        print(f"\n### {name}: min cosine {min(r['cosine'] for r in rows):.6f}, identical tokens on {same}/{len(rows)} "
              "clips")
        print("| clip | cosine | 40 tokens identical | first divergence (ref. margin) | teacher-forced | "
              "margins where teacher-forced differs |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            div = "-" if r["first_divergence"] is None else f"{r['first_divergence']} ({r['margin_at_divergence']:.3f})"
            print(f"| {r['clip']} | {r['cosine']:.6f} | {'yes' if r['identical'] else 'no'} | {div} | "
                  f"{r['teacher_forced']} | {r['teacher_forced_wrong_margins'] or ''} |")


# ---------------------------------------------------------------------------------------------- memory
def _child_convert(args) -> None:
    from mlx_asr.convert import convert
    from mlx_asr.quantize import QuantPolicy

    policy = QuantPolicy.create(args.bits, args.group_size, embed_bits=args.embed_bits) if args.bits else None
    start = time.perf_counter()
    result = convert(args.model, args.output, dtype=args.dtype, policy=policy, force=True, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(),
                      "weight_bytes": result.weight_bytes, "source_bytes": result.source_bytes}))


def _child_pipeline(args) -> None:
    import mlx.core as mx

    from mlx_asr import AsrPipeline

    start = time.perf_counter()
    pipe = AsrPipeline.from_pretrained(args.model, backend="mlx", device="cpu", dtype=args.compute_dtype)
    load = time.perf_counter() - start
    load_rss = _peak_rss_mb()
    result = pipe.transcribe_detailed(args.audio, max_new_tokens=args.max_new_tokens,
                                      min_new_tokens=args.max_new_tokens)
    print(json.dumps({"load_seconds": load, "peak_rss_after_load_mb": load_rss, "peak_rss_mb": _peak_rss_mb(),
                      "mlx_peak_mb": mx.get_peak_memory() / 1e6, "tokens": len(result.logprobs),
                      "dtype": pipe.backend.dtype, "quantized": pipe.checkpoint.is_quantized}))


def cmd_memory(args) -> None:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = Path(tmp) / "converted"
        convert_cmd = [sys.executable, __file__, "_convert", "--model", str(args.model), "--output", str(out),
                       "--bits", str(args.bits), "--group-size", str(args.group_size), "--dtype", args.dtype,
                       "--embed-bits", args.embed_bits]
        conv = subprocess.run(convert_cmd, env=env, capture_output=True, text=True, check=False)
        if conv.returncode:
            raise SystemExit(conv.stderr[-3000:])
        conversion = json.loads(conv.stdout.strip().splitlines()[-1])
        pipe_cmd = [sys.executable, __file__, "_pipeline", "--model", str(out), "--audio", str(args.audio),
                    "--max-new-tokens", str(args.max_new_tokens)]
        if args.compute_dtype:
            pipe_cmd += ["--compute-dtype", args.compute_dtype]
        runs = []
        for _ in range(args.repeats):
            res = subprocess.run(pipe_cmd, env=env, capture_output=True, text=True, check=False)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    report = {"model": str(args.model), "bits": args.bits, "dtype": args.dtype, "embed_bits": args.embed_bits,
              "compute_dtype": args.compute_dtype,
              "audio": str(args.audio), "conversion": conversion, "pipeline": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="8/4-bit accuracy on the tiny fixture")
    acc.add_argument("--json")
    acc.add_argument("--only", nargs="*")
    acc.add_argument("--trained", action="store_true", help="the fine-tuned tiny checkpoint (tests/fixtures/trained)")
    mem = sub.add_parser("memory", help="conversion and pipeline peak memory")
    mem.add_argument("--model", required=True, help="official-layout folder (benchmarks/make_checkpoint.py)")
    mem.add_argument("--bits", type=int, default=4)
    mem.add_argument("--group-size", type=int, default=64)
    mem.add_argument("--embed-bits", default="8")
    mem.add_argument("--dtype", default="bfloat16")
    mem.add_argument("--audio", default=str(AUDIO / "short_2s.wav"))
    mem.add_argument("--max-new-tokens", type=int, default=8)
    mem.add_argument("--compute-dtype", help="pipeline dtype (default: the converted folder's)")
    mem.add_argument("--repeats", type=int, default=1)
    mem.add_argument("--workdir", default=None, help="where the temporary converted folder goes")
    mem.add_argument("--json")
    dec = sub.add_parser("decode", help="decode step vs mlx-lm and mlx-qwen3-asr",
                         description=f"OpenBLAS ({OPENBLAS}) is preloaded into the children when present.")
    dec.add_argument("--model", required=True, help="float folder every system can load (mlx-asr convert)")
    dec.add_argument("--audio", default=str(AUDIO / "medium_10s.flac"))
    dec.add_argument("--dtype", default="float32")
    dec.add_argument("--tokens", type=int, default=12)
    dec.add_argument("--repeats", type=int, default=1)
    dec.add_argument("--rounds", type=int, default=3, help="alternating rounds of all systems")
    dec.add_argument("--probe-tokens", type=int, default=4)
    dec.add_argument("--peer-python", help="python of a venv with mlx-qwen3-asr installed")
    dec.add_argument("--pipelined-too", action="store_true", help="also time mlx-asr's pipelined mode")
    dec.add_argument("--no-openblas", action="store_true")
    dec.add_argument("--json")
    for name in ("_decode-ours", "_decode-mlxlm", "_decode-peer"):
        child = sub.add_parser(name)
        for opt in ("--model", "--audio", "--dtype", "--prompt-ids", "--pipelined"):
            child.add_argument(opt)
        for opt in ("--tokens", "--repeats", "--probe-tokens", "--prompt-len"):
            child.add_argument(opt, type=int)
    conv = sub.add_parser("_convert")
    for opt in ("--model", "--output", "--dtype", "--embed-bits"):
        conv.add_argument(opt)
    conv.add_argument("--bits", type=int)
    conv.add_argument("--group-size", type=int)
    pipe = sub.add_parser("_pipeline")
    pipe.add_argument("--model")
    pipe.add_argument("--audio")
    pipe.add_argument("--max-new-tokens", type=int)
    pipe.add_argument("--compute-dtype")
    args = parser.parse_args()
    children = {"_decode-ours": _decode_ours, "_decode-mlxlm": _decode_mlxlm, "_decode-peer": _decode_peer}
    if args.command in children:
        print(json.dumps(children[args.command](args)))
    elif args.command == "_convert":
        _child_convert(args)
    elif args.command == "_pipeline":
        _child_pipeline(args)
    else:
        {"accuracy": cmd_accuracy, "memory": cmd_memory, "decode": cmd_decode}[args.command](args)


if __name__ == "__main__":
    main()
