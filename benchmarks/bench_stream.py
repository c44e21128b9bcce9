#!/usr/bin/env python3
"""Streaming benchmark: per-update processing time and memory over a long simulated session.

A microphone is simulated by feeding fixture speech (``tests/fixtures/audio/long_60s.flac`` repeated) to
``pipe.stream()`` one chunk at a time, as fast as updates are computed; each update's processing time is
compared with the chunk duration (real time means every update finishes before the next chunk has been
recorded). Each update's process CPU time is recorded too: on shared cores the wall time also counts
the time other processes held the CPU, the CPU time does not (with ``--threads 1`` it is closer to what the
update takes on a core of its own; shared caches and memory bandwidth still count). Memory is the process
RSS after each update.

Random-weight checkpoints (``benchmarks/make_checkpoint.py``) never emit the stop token, so every update
decodes exactly ``--tokens-per-update`` tokens. The default, 13, is what a real model decodes for 2 s of
speech: the 5 rolled-back tokens again, ~7 new ones (3.5 tokens/s, about 2.7 English words/s) and the stop
token; here all 13 are kept, so the text grows by 8 tokens per update, a little faster than real speech.
Random text also repeats, which exercises the bound on the text prefix.

    python benchmarks/make_checkpoint.py --size 0.6b --out /tmp/qwen3-asr-0.6b-random
    python benchmarks/bench_stream.py --model /tmp/qwen3-asr-0.6b-random --minutes 5 --json /tmp/stream.json

``--modes live`` simulates the microphone at real-time pace instead, as ``mlx-asr listen`` runs it: audio
piles up while an update runs and the next update decodes all of it (``catch_up``); it reports the lag
between speech and text, which stays bounded when updates take longer than a chunk.

Exact mode re-encodes everything on every update, so its updates grow with the session; it is stopped
after an update slower than ``--exact-stop`` seconds (default 30) and reported up to there.

``--agreement`` instead compares the two modes' texts, update by update, on every fixture clip (with
the whole session in view, then with the cached mode's default window), e.g. with the tiny checkpoint:

    python benchmarks/bench_stream.py --model tests/fixtures/tiny --agreement --language auto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "tests" / "fixtures" / "audio" / "long_60s.flac"


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # Linux fallback
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


def _session_audio(minutes: float):
    import numpy as np

    from mlx_asr.audio import load_audio

    speech = load_audio(SPEECH)
    need = int(minutes * 60 * 16000)
    return np.tile(speech, need // speech.shape[0] + 1)[:need]


def run_mode(pipe, audio, mode: str, args) -> dict:
    chunk = int(args.chunk_seconds * 16000)
    options = dict(mode=mode, chunk_seconds=args.chunk_seconds, max_new_tokens=args.tokens_per_update)
    if args.context_seconds is not None:
        options["context_seconds"] = args.context_seconds or None
    warm = pipe.stream(language=args.language, **options)  # first calls allocate and pick kernels
    warm.feed(audio[: 2 * chunk])
    warm.finish()
    session = pipe.stream(language=args.language, **options)
    rows, stopped = [], None
    start = time.perf_counter()
    cpu = time.process_time()
    for i in range(0, audio.shape[0], chunk):
        for update in session.iter_feed(audio[i : i + chunk]):
            cpu, used = time.process_time(), time.process_time() - cpu
            rows.append(dict(
                audio=round(update.audio_seconds, 2), seconds=round(update.seconds, 4), cpu_seconds=round(used, 4),
                encoder=round(update.timings.encoder, 4), prefill=round(update.timings.prefill, 4),
                decode=round(update.timings.decode, 4), prompt_tokens=update.prompt_tokens,
                prefill_tokens=update.prefill_tokens, new_tokens=update.new_tokens,
                in_view=round(session.audio_in_view, 2), rss_mb=round(_rss_mb(), 1),
            ))
            if not args.quiet and (len(rows) % args.every == 0 or len(rows) == 1):
                r = rows[-1]
                print(f"  {mode:6s} {r['audio']:7.1f} s audio: update {r['seconds']:6.3f} s (enc {r['encoder']:.3f}, "
                      f"prefill {r['prefill']:.3f} for {r['prefill_tokens']}, decode {r['decode']:.3f} for "
                      f"{r['new_tokens']}), prompt {r['prompt_tokens']}, view {r['in_view']:.0f} s, "
                      f"rss {r['rss_mb']:.0f} MB", flush=True)
            if mode == "exact" and update.seconds > args.exact_stop:
                stopped = update.audio_seconds
                break
        if stopped is not None:
            break
    wall = time.perf_counter() - start
    return summarize(mode, rows, args.chunk_seconds, wall, stopped, session.stats)


def summarize(mode, rows, chunk_seconds, wall, stopped, stats) -> dict:
    times = [r["seconds"] for r in rows]
    cpu = [r["cpu_seconds"] for r in rows]
    half = len(rows) // 2
    late = rows[half:]
    minute = [r for r in rows if r["audio"] <= 60] or rows
    out = dict(
        mode=mode, updates=len(rows), audio_seconds=rows[-1]["audio"] if rows else 0, wall_seconds=round(wall, 1),
        first_update_seconds=times[0] if times else None,
        first_partial_latency_seconds=round(chunk_seconds + times[0], 3) if times else None,
        median_update=round(statistics.median(times), 4),
        p95_update=round(sorted(times)[int(0.95 * (len(times) - 1))], 4),
        max_update=round(max(times), 4), over_real_time=sum(t >= chunk_seconds for t in times),
        median_cpu=round(statistics.median(cpu), 4), max_cpu=round(max(cpu), 4),
        cpu_over_real_time=sum(t >= chunk_seconds for t in cpu),
        median_first_half=round(statistics.median(times[:half] or times), 4),
        median_second_half=round(statistics.median(times[half:]), 4),
        rss_mb_after_1_min=max(r["rss_mb"] for r in minute), rss_mb_max=max(r["rss_mb"] for r in rows),
        rss_mb_second_half=[min(r["rss_mb"] for r in late), max(r["rss_mb"] for r in late)],
        max_prompt_tokens=max(r["prompt_tokens"] for r in rows),
        max_prompt_tokens_second_half=max(r["prompt_tokens"] for r in late),
        stopped_at_audio_seconds=stopped,
        stats=dict(vars(stats)),
        rows=rows,
    )
    return out


def run_live(pipe, audio, args) -> dict:
    """A live microphone simulated at real-time pace with catch-up, as ``mlx-asr listen`` runs it.

    Audio "arrives" at wall-clock pace in 0.1-s blocks; each read takes everything that arrived since the
    last one, so audio piles up while an update runs and the session (``catch_up=True``) decodes it in one
    update. Lag = when an update's text is ready minus when its last sample was spoken.
    """
    options = dict(mode="cached", chunk_seconds=args.chunk_seconds, max_new_tokens=args.tokens_per_update)
    if args.context_seconds is not None:
        options["context_seconds"] = args.context_seconds or None
    warm = pipe.stream(language=args.language, **options)
    warm.feed(audio[: int(2 * args.chunk_seconds * 16000)])
    warm.finish()
    session = pipe.stream(language=args.language, catch_up=True, **options)
    block, sent, rows = 1600, 0, []
    start = time.perf_counter()
    while sent < audio.shape[0]:
        elapsed = time.perf_counter() - start
        arrived = min(audio.shape[0], int(elapsed * 16000) // block * block)
        if arrived <= sent:
            time.sleep(max(0.001, min(0.05, (sent + block) / 16000 - elapsed)))
            continue
        for update in session.iter_feed(audio[sent:arrived]):
            lag = time.perf_counter() - start - update.audio_seconds
            rows.append(dict(audio=round(update.audio_seconds, 2), seconds=round(update.seconds, 4),
                             lag=round(lag, 3), prefill_tokens=update.prefill_tokens, rss_mb=round(_rss_mb(), 1)))
            if not args.quiet and (len(rows) % args.every == 0 or len(rows) == 1):
                r = rows[-1]
                print(f"  live   {r['audio']:7.1f} s audio: update {r['seconds']:6.3f} s, lag {r['lag']:6.3f} s, "
                      f"prefill {r['prefill_tokens']}, rss {r['rss_mb']:.0f} MB", flush=True)
        sent = arrived
    lags = [r["lag"] for r in rows]
    gaps = [b["audio"] - a["audio"] for a, b in zip(rows, rows[1:], strict=False)]
    half = len(rows) // 2
    return dict(
        mode="live (cached, catch-up)", updates=len(rows), audio_seconds=rows[-1]["audio"],
        median_lag=round(statistics.median(lags), 3), max_lag=round(max(lags), 3),
        median_lag_first_half=round(statistics.median(lags[:half] or lags), 3),
        median_lag_second_half=round(statistics.median(lags[half:]), 3),
        median_audio_per_update=round(statistics.median(gaps), 2) if gaps else None,
        median_update=round(statistics.median(r["seconds"] for r in rows), 4),
        rss_mb_max=max(r["rss_mb"] for r in rows),
        rss_mb_second_half=[min(r["rss_mb"] for r in rows[half:]), max(r["rss_mb"] for r in rows[half:])],
        stats=dict(vars(session.stats)), rows=rows,
    )


def agreement(pipe, args) -> list[dict]:
    """Cached vs exact mode on the fixture clips: how many updates give the same (language, text)."""
    import numpy as np

    from mlx_asr.audio import load_audio

    audio_dir = ROOT / "tests" / "fixtures" / "audio"
    clips = {p.name: load_audio(p) for p in sorted(audio_dir.iterdir()) if p.suffix in (".wav", ".flac", ".mp3")}
    rng = np.random.default_rng(0)  # 9 s of near-silence before speech: the log-mel floor differs
    clips["quiet9s+medium_10s (synthetic)"] = np.concatenate(
        [(rng.standard_normal(9 * 16000) * 1e-4).astype(np.float32), clips["medium_10s.flac"]]
    )
    configs = {  # label: (exact mode's context_seconds, cached mode's)
        "all in view": (None, None),
        "16-s window in both": (16.0, 16.0),
        "defaults (exact: all, cached: 16 s)": ("default", "default"),
    }
    if args.configs:
        wanted = args.configs.split(",")
        configs = {label: c for i, (label, c) in enumerate(configs.items()) if str(i) in wanted}
    rows = []
    for label, contexts in configs.items():
        for name, wav in clips.items():
            runs = {}
            for mode, context in zip(("exact", "cached"), contexts, strict=True):
                options = dict(mode=mode, max_new_tokens=args.tokens_per_update)
                if context != "default":
                    options["context_seconds"] = context
                session = pipe.stream(language=None if args.language == "auto" else args.language, **options)
                updates = list(session.iter_feed(wav)) + list(session.iter_finish())
                runs[mode] = [(u.language, u.text) for u in updates]
                if updates[-1].chunk == (updates[-2].chunk if len(updates) > 1 else -1):
                    runs[mode].pop(-2)  # finish() without a tail repeats the last update
            same = sum(a == b for a, b in zip(runs["exact"], runs["cached"], strict=True))
            row = dict(clip=name, config=label, updates=len(runs["exact"]), same=same,
                       final_same=runs["exact"][-1] == runs["cached"][-1])
            rows.append(row)
            print(f"  {label:36s} {name:34s} {same:3d}/{row['updates']:3d} updates equal, final "
                  f"{'equal' if row['final_same'] else 'DIFFERENT'}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (a 0.6B-shaped random checkpoint works)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--quantize", default=None, help="8 or 4: weight-only quantized LLM; w8a8: int8 weights and activations"
    )
    parser.add_argument("--quantize-audio", action="store_true", help="torch: the audio encoder's linears in w8a8 too")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--modes", default="cached,exact", help="cached, exact and/or live (real-time pace, catch-up)")
    parser.add_argument("--chunk-seconds", type=float, default=2.0)
    parser.add_argument("--tokens-per-update", type=int, default=13)
    parser.add_argument("--context-seconds", type=float, default=None, help="0: unbounded (default: the mode's)")
    parser.add_argument("--language", default="English")
    parser.add_argument("--exact-stop", type=float, default=30.0)
    parser.add_argument("--every", type=int, default=10, help="print every N-th update")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--agreement", action="store_true", help="cached vs exact text on the fixture clips instead")
    parser.add_argument("--configs", default=None, help="with --agreement: 0 all in view, 1 16-s window, 2 defaults")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from mlx_asr.pipeline import AsrPipeline

    options = {"threads": args.threads} if args.threads else {}
    if args.quantize:
        options["quantize"] = int(args.quantize) if args.quantize.isdigit() else args.quantize
    if args.quantize_audio:
        options["quantize_audio"] = True
    pipe = AsrPipeline.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                       **options)
    if args.agreement:
        rows = agreement(pipe, args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    audio = _session_audio(args.minutes)
    print(f"{pipe.backend.name} {pipe.backend.device} {pipe.backend.dtype}, {args.minutes} min session, "
          f"{args.chunk_seconds} s chunks, {args.tokens_per_update} tokens per update, load average "
          f"{os.getloadavg()[0]:.1f}, rss after load {_rss_mb():.0f} MB", flush=True)
    results = []
    for mode in args.modes.split(","):
        result = run_live(pipe, audio, args) if mode == "live" else run_mode(pipe, audio, mode, args)
        results.append(result)
        show = {k: v for k, v in result.items() if k != "rows"}
        print(json.dumps(show, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, results=results)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
