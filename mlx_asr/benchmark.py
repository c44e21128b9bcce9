"""Speed, memory and accuracy measurements behind ``mlx-asr benchmark``."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .audio import load_audio
from .config import SAMPLE_RATE
from .errors import AudioError
from .pipeline import AsrPipeline, Transcription
from .textnorm import is_character_language, normalize_text


def synthetic_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like test signal: voiced harmonics with syllable-rate envelopes and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5
    signal = 0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.shape)
    return signal.astype(np.float32)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def current_rss_mb() -> float:
    """Resident memory now, in MB."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize() / 1e6
    except OSError:
        return peak_rss_mb()


def _stage_row(seconds: float, results: list[Transcription]) -> dict[str, Any]:
    med = {k: statistics.median(getattr(r.timings, k) for r in results)
           for k in ("audio", "features", "encoder", "prefill", "decode")}
    total = statistics.median(r.timings.total for r in results)
    tokens = len(results[0].logprobs)
    per_token = med["decode"] / (tokens - 1) if tokens > 1 else 0.0
    return {
        "seconds": seconds,
        "rtf": round(total / seconds, 4),
        "total_s": round(total, 4),
        **{f"{k}_s": round(v, 4) for k, v in med.items()},
        "tokens": tokens,
        "decode_ms_per_token": round(per_token * 1000, 2),
        "tokens_per_s": round(1 / per_token, 2) if per_token else 0.0,
    }


def speed(
    pipe: AsrPipeline,
    lengths: list[float],
    audio: Path | None = None,
    runs: int = 2,
    language: str | None = None,
    min_new_tokens: int = 0,
    max_new_tokens: int = 512,
) -> dict[str, Any]:
    """Per-length RTF and stage times (medians over ``runs`` after one warm-up), tokens/s, memory."""
    clips = [(len(s) / SAMPLE_RATE, s) for s in [load_audio(audio)]] if audio else [
        (sec, synthetic_clip(sec, seed=i)) for i, sec in enumerate(lengths)
    ]
    kwargs = dict(language=language, min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens)
    warm_start = time.perf_counter()
    pipe.transcribe_detailed((clips[0][1], SAMPLE_RATE), **kwargs)
    warmup = time.perf_counter() - warm_start
    rows = []
    for seconds, samples in clips:
        results = [pipe.transcribe_detailed((samples, SAMPLE_RATE), **kwargs) for _ in range(runs)]
        rows.append(_stage_row(seconds, results))
    return {
        "mode": "speed",
        **_setup(pipe),
        "first_call_s": round(warmup, 4),
        "runs": runs,
        "clips": rows,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": _round(pipe.backend.peak_device_mb()),
        "cpu_threads": pipe.backend.cpu_threads(),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _setup(pipe: AsrPipeline) -> dict[str, Any]:
    return {
        "model": str(pipe.checkpoint.path),
        "backend": pipe.backend.name,
        "device": pipe.backend.device,
        "dtype": pipe.backend.dtype,
        "quantize": getattr(pipe.backend, "quantize", None),
        "quantize_audio": getattr(pipe.backend, "quantize_audio", False),
        "load_s": round(pipe.load_time, 4),
    }


def read_test_set(path: Path) -> list[tuple[Path, str, str | None]]:
    """``(audio, reference, language)`` from a LibriSpeech-style folder or a JSONL manifest."""
    if path.is_file():
        items = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                audio = Path(row["audio"])
                items.append((audio if audio.is_absolute() else path.parent / audio, row["text"], row.get("language")))
        return items
    if not path.is_dir():
        raise AudioError(f"{path}: test set not found")
    items = []
    for trans in sorted(path.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if line.strip():
                utt, _, text = line.partition(" ")
                audio = next((trans.parent / f"{utt}{ext}" for ext in (".flac", ".wav", ".mp3")
                              if (trans.parent / f"{utt}{ext}").exists()), trans.parent / f"{utt}.flac")
                items.append((audio, text, None))
    if not items:
        raise AudioError(f"{path}: no *.trans.txt transcripts found")
    return items


def error_rate(references: list[str], hypotheses: list[str], by_character: bool) -> float:
    """WER (or CER) after :func:`normalize_text`, pooled over the set (jiwer)."""
    import jiwer

    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    if by_character:
        refs = [r.replace(" ", "") for r in refs]
        hyps = [h.replace(" ", "") for h in hyps]
        return float(jiwer.cer(refs, hyps))
    return float(jiwer.wer(refs, hyps))


def accuracy(pipe: AsrPipeline, test_set: Path, language: str | None = None, max_new_tokens: int = 512) -> dict:
    """Transcribe a test set and score it: WER for word languages, CER for zh/ja/ko/yue/th."""
    items = read_test_set(test_set)
    refs, hyps, by_char, audio_s, proc_s, failures = [], [], [], 0.0, 0.0, []
    for audio, ref, lang in items:
        try:
            result = pipe.transcribe_detailed(str(audio), language=lang or language, max_new_tokens=max_new_tokens)
        except AudioError as exc:
            failures.append(str(exc))
            continue
        refs.append(ref)
        hyps.append(result.text)
        by_char.append(is_character_language(lang or result.language))
        audio_s += result.duration
        proc_s += result.timings.total
    report: dict[str, Any] = {"mode": "accuracy", **_setup(pipe), "utterances": len(refs), "failed": failures}
    words = [(r, h) for r, h, c in zip(refs, hyps, by_char, strict=True) if not c]
    chars = [(r, h) for r, h, c in zip(refs, hyps, by_char, strict=True) if c]
    if words:
        report["wer"] = round(error_rate(*map(list, zip(*words, strict=True)), by_character=False), 4)
    if chars:
        report["cer"] = round(error_rate(*map(list, zip(*chars, strict=True)), by_character=True), 4)
    report["rtf"] = round(proc_s / audio_s, 4) if audio_s else None
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return report


def stress(pipe: AsrPipeline, count: int, language: str | None = None, max_new_tokens: int = 64) -> dict:
    """Transcribe ``count`` clips in a row and report whether resident memory grows."""
    rss = []
    for i in range(count):
        pipe.transcribe_detailed((synthetic_clip(3 + (i % 5), seed=i), SAMPLE_RATE), language=language,
                                 max_new_tokens=max_new_tokens)
        rss.append(current_rss_mb())
    settled = rss[len(rss) // 10:] or rss
    return {
        "clips": count,
        "rss_first_mb": round(rss[0], 1),
        "rss_last_mb": round(rss[-1], 1),
        "rss_max_mb": round(max(rss), 1),
        "growth_after_warmup_mb": round(settled[-1] - settled[0], 1),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable form of a speed or accuracy report."""
    quantize = report.get("quantize")
    quant = f", {'int' if isinstance(quantize, int) else ''}{quantize}" if quantize else ""
    quant += ", w8a8 audio encoder" if report.get("quantize_audio") else ""
    head = (f"model {report['model']} | backend {report['backend']} on {report['device']}, {report['dtype']}"
            f"{quant} | load {report['load_s']:.2f} s")
    lines = [head]
    if report["mode"] == "speed":
        device = report.get("peak_device_mb")
        device_memory = "" if device is None else f", peak device memory {device:.0f} MB"
        threads = "" if report.get("cpu_threads") is None else f", {report['cpu_threads']} CPU thread(s) at the end"
        lines.append(f"first call {report['first_call_s']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB"
                     f"{device_memory}{threads}, median of {report['runs']} run(s)")
        lines.append(f"{'audio':>7} {'rtf':>7} {'features':>9} {'encoder':>8} {'prefill':>8} {'decode':>8} "
                     f"{'tokens':>6} {'ms/tok':>7} {'tok/s':>7}")
        for r in report["clips"]:
            lines.append(f"{r['seconds']:>6.1f}s {r['rtf']:>7.3f} {r['features_s']:>8.3f}s {r['encoder_s']:>7.3f}s "
                         f"{r['prefill_s']:>7.3f}s {r['decode_s']:>7.3f}s {r['tokens']:>6} "
                         f"{r['decode_ms_per_token']:>7.1f} {r['tokens_per_s']:>7.1f}")
    else:
        scores = ", ".join(f"{k.upper()} {report[k] * 100:.2f} %" for k in ("wer", "cer") if k in report)
        lines.append(f"{report['utterances']} utterances: {scores or 'nothing scored'}, rtf {report['rtf']}")
        lines += [f"failed: {f}" for f in report["failed"]]
    if "stress" in report:
        s = report["stress"]
        lines.append(f"stress: {s['clips']} clips, RSS {s['rss_first_mb']:.0f} -> {s['rss_last_mb']:.0f} MB "
                     f"(max {s['rss_max_mb']:.0f}, growth after warm-up {s['growth_after_warmup_mb']:+.1f} MB)")
    return "\n".join(lines)
