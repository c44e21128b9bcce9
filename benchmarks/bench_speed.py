#!/usr/bin/env python3
"""Speed and memory of the torch backend (bf16 / int8 / int4 / ...) side by side with the official qwen-asr.

On the CPU by default; ``--device cuda`` runs both on the GPU (stage times then synchronise the device, and
the reports add the peak of GPU memory allocated, ``peak_device_mb``).

Every measurement runs in a fresh process, so load time and peak RSS belong to one configuration:

* speed   (ours, official): load, then one warm-up and ``--runs`` transcriptions of ``--audio`` (default the
  10 s fixture) forcing ``--tokens`` new tokens (min_new_tokens = max_new_tokens); median stage times
  (audio decode, log-mel, encoder, prefill = first token, decode ms/token), RTF, peak RSS.
* cold    (ours, official): wall time from spawning the interpreter until the first transcript of a
  ``--short-seconds`` clip (cut from ``--audio``) is back, forcing ``--cold-tokens`` new tokens; for ours
  also the command line (``mlx-asr transcribe``): until the transcript is printed, and until it exits.
* batch   (ours): clips/s of ``pipe.transcribe_batch`` over ``--batch-clips`` different 10 s clips cut from
  the 60 s fixture, at each of ``--batch-sizes``.

The official package pins transformers 4.57.6, so it lives in its own venv: pass its interpreter with
``--official-python``. This file is also the worker script of both sides (``--worker``): it imports only the
standard library at module level, so the official venv can run it.

    python benchmarks/bench_speed.py --model benchmarks/models/0.6b-random \\
        --official-python /tmp/venv-official/bin/python --json bench.json

The CPU may be shared: every worker records the 1-minute load average before and after it ran, and
``--repeat`` runs each fresh-process measurement several times (medians are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AUDIO_10S = ROOT / "tests" / "fixtures" / "audio" / "medium_10s.flac"
AUDIO_60S = ROOT / "tests" / "fixtures" / "audio" / "long_60s.flac"
QUANT = {"bf16": None, "fp16": None, "fp32": None, "int8": 8, "int4": 4, "w8a8": "w8a8", "w8a8a": "w8a8"}
DTYPE = {"fp16": "float16", "fp32": "float32"}  # the other configs compute in bfloat16
AUDIO_W8A8 = ("w8a8a",)  # configs whose audio encoder linears are W8A8 too (quantize_audio)
STAGES = ("audio", "features", "encoder", "prefill", "decode")


# ---------------------------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux ``ru_maxrss`` is in KiB), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 1e6


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _stall_us() -> float | None:
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as fh:
            some = fh.readline().split()
        return float(some[-1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


class Pressure:
    """Share of wall time during which some runnable task waited for a CPU (Linux PSI ``cpu some``).

    0 on idle cores; 0.5 means that half of the time something (another process, or one of ours) was queued.
    ``None`` where ``/proc/pressure/cpu`` does not exist.
    """

    def __init__(self) -> None:
        self.start, self.stall = time.perf_counter(), _stall_us()

    def value(self) -> float | None:
        stall = _stall_us()
        if stall is None or self.stall is None:
            return None
        return round((stall - self.stall) / 1e6 / max(1e-9, time.perf_counter() - self.start), 3)


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def median(values):
    return statistics.median(values) if values else None


def _stage_summary(runs: list[dict], tokens: int, seconds: float) -> dict:
    out = {f"{k}_s": median([r[k] for r in runs]) for k in runs[0] if k != "total"}
    out["total_s"] = median([r["total"] for r in runs])
    out["decode_ms_per_token"] = 1000 * out["decode_s"] / max(1, tokens - 1)
    out["rtf"] = out["total_s"] / seconds
    return out


# ---------------------------------------------------------------------------------------------- our workers
def _our_pipeline(spec: dict):
    from mlx_asr.pipeline import AsrPipeline

    options = {"quantize": QUANT[spec["config"]], "quantize_audio": spec["config"] in AUDIO_W8A8}
    if spec.get("threads"):
        options["threads"] = spec["threads"]
    dtype = DTYPE.get(spec["config"], "bfloat16")
    return AsrPipeline.from_pretrained(spec["model"], backend="torch", device=_device(spec), dtype=dtype, **options)


def _device(spec: dict) -> str:
    return spec.get("device", "cpu")


def _peak_device_mb(spec: dict) -> float | None:
    if _device(spec) == "cpu":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 1e6


def worker_ours_speed(spec: dict) -> dict:
    t0 = time.perf_counter()
    import mlx_asr.pipeline  # noqa: F401

    import_s = time.perf_counter() - t0
    load0 = loadavg()
    pipe = _our_pipeline(spec)
    after_load = {"rss_after_load_mb": rss_mb(), "peak_rss_after_load_mb": peak_rss_mb()}
    n = spec["tokens"]
    kwargs = {"max_new_tokens": n, "min_new_tokens": n}
    t0 = time.perf_counter()
    first = pipe.transcribe_detailed(spec["audio"], **kwargs)
    first_s = time.perf_counter() - t0
    runs, pressure = [], Pressure()
    for _ in range(spec["runs"]):
        res = pipe.transcribe_detailed(spec["audio"], **kwargs)
        assert len(res.logprobs) == n, len(res.logprobs)
        runs.append({**{k: getattr(res.timings, k) for k in STAGES}, "total": res.timings.total})
    return {
        "impl": "ours",
        "config": spec["config"],
        "import_s": import_s,
        "load_s": pipe.load_time,
        "first_call_s": first_s,
        "audio_seconds": first.duration,
        "tokens": n,
        **_stage_summary(runs, n, first.duration),
        **after_load,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": _peak_device_mb(spec),
        "runs": runs,
        "text": first.raw[:60],
        "threads": _torch_threads(),
        "loadavg": [load0, loadavg()],
        "pressure": pressure.value(),
    }


def worker_ours_cold(spec: dict) -> dict:
    pressure = Pressure()
    t0 = time.perf_counter()
    pipe = _our_pipeline(spec)
    t1 = time.perf_counter()
    n = spec["tokens"]
    res = pipe.transcribe_detailed(spec["audio"], max_new_tokens=n, min_new_tokens=n)
    done = time.time()
    return {
        "impl": "ours",
        "config": spec["config"],
        "done_epoch": done,
        "in_process_load_s": t1 - t0,
        "transcribe_s": time.perf_counter() - t1,
        "tokens": len(res.logprobs),
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": [loadavg()],
        "pressure": pressure.value(),
    }


def _batch_clips(count: int, seconds: float = 10.0):
    """``count`` different ``seconds``-long clips cut from the 60 s fixture (evenly spread starts)."""
    from mlx_asr.audio import load_audio

    samples = load_audio(str(AUDIO_60S))
    width = int(seconds * 16000)
    span = samples.shape[0] - width
    starts = [round(i * span / max(1, count - 1)) for i in range(count)]
    return [(samples[s : s + width].copy(), 16000) for s in starts]


def worker_ours_batch(spec: dict) -> dict:
    pipe = _our_pipeline(spec)
    clips = _batch_clips(spec["clips"])
    n = spec["tokens"]
    kwargs = {"max_new_tokens": n, "min_new_tokens": n}
    pipe.transcribe_batch(clips[:2], batch_size=2, **kwargs)  # warm-up (both code paths' first calls)
    pipe.transcribe_detailed(clips[0], **kwargs)
    sizes = spec["batch_sizes"]
    times: dict[int, list[float]] = {size: [] for size in sizes}
    pressures: dict[int, list[float | None]] = {size: [] for size in sizes}
    for _ in range(spec["runs"]):  # sizes interleaved, so a busy spell does not hit one size only
        for size in sizes:
            pressure, t0 = Pressure(), time.perf_counter()
            results = pipe.transcribe_batch(clips, batch_size=size, **kwargs)
            times[size].append(time.perf_counter() - t0)
            pressures[size].append(pressure.value())
            assert all(len(r.logprobs) == n for r in results)
    rows = []
    for size in sizes:
        seconds = median(times[size])
        known = [p for p in pressures[size] if p is not None]
        rows.append(
            {
                "batch_size": size,
                "seconds": seconds,
                "clips_per_s": len(clips) / seconds,
                "times": times[size],
                "pressure": median(known) if known else None,
            }
        )
    return {
        "impl": "ours",
        "config": spec["config"],
        "clips": len(clips),
        "tokens": n,
        "rows": rows,
        "peak_rss_mb": peak_rss_mb(),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- official workers
def _official_load(spec: dict):
    import torch
    from qwen_asr import Qwen3ASRModel

    return Qwen3ASRModel.from_pretrained(
        spec["model"], dtype=torch.bfloat16, device_map=_device(spec), max_new_tokens=spec["tokens"]
    )


def worker_official_speed(spec: dict) -> dict:
    """The official pipeline stage by stage (normalize_audios -> processor -> generate), N tokens forced."""
    t0 = time.perf_counter()
    import torch
    from qwen_asr.inference.utils import normalize_audios

    import_s = time.perf_counter() - t0
    load0 = loadavg()
    t0 = time.perf_counter()
    asr = _official_load(spec)
    load_s = time.perf_counter() - t0
    after_load = {"rss_after_load_mb": rss_mb(), "peak_rss_after_load_mb": peak_rss_mb()}
    model, proc = asr.model, asr.processor
    tower = model.thinker.audio_tower
    marks: dict[str, list[float]] = {"start": [], "end": []}
    cuda = _device(spec) != "cpu"

    def now() -> float:  # on a GPU, once the queued work is done
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    tower.register_forward_pre_hook(lambda *a: marks["start"].append(now()))
    tower.register_forward_hook(lambda *a: marks["end"].append(now()))

    class Streamer:  # transformers streamer: put() once with the prompt, then once per new token
        def __init__(self):
            self.t: list[float] = []

        def put(self, value):
            self.t.append(now())

        def end(self):
            pass

    n = spec["tokens"]

    def once() -> tuple[dict, float, str]:
        marks["start"].clear()
        marks["end"].clear()
        t0 = time.perf_counter()
        wav = normalize_audios(spec["audio"])[0]
        t1 = time.perf_counter()
        prompt = asr._build_text_prompt(context="", force_language=None)
        inputs = proc(text=[prompt], audio=[wav], return_tensors="pt", padding=True)
        inputs = inputs.to(model.device).to(model.dtype)
        t2 = time.perf_counter()
        st = Streamer()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, streamer=st)
        length = inputs["input_ids"].shape[1]
        text = proc.batch_decode(
            out.sequences[:, length:], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )[0]
        t4 = time.perf_counter()
        assert out.sequences.shape[1] - length == n
        enc = marks["end"][0] - marks["start"][0]
        rec = {
            "audio": t1 - t0,
            "features": (t2 - t1) + (marks["start"][0] - t2),  # processor + generate set-up before the encoder
            "encoder": enc,
            "prefill": st.t[1] - marks["end"][0],
            "decode": st.t[-1] - st.t[1],
        }
        rec["total"] = t4 - t0
        return rec, len(wav) / 16000.0, text

    t0 = time.perf_counter()
    _, seconds, text = once()
    first_s = time.perf_counter() - t0
    pressure = Pressure()
    runs = [once()[0] for _ in range(spec["runs"])]
    return {
        "impl": "official",
        "config": "bf16",
        "import_s": import_s,
        "load_s": load_s,
        "first_call_s": first_s,
        "audio_seconds": seconds,
        "tokens": n,
        **_stage_summary(runs, n, seconds),
        **after_load,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": _peak_device_mb(spec),
        "runs": runs,
        "text": text[:60],
        "threads": torch.get_num_threads(),
        "loadavg": [load0, loadavg()],
        "pressure": pressure.value(),
    }


def worker_official_cold(spec: dict) -> dict:
    pressure = Pressure()
    t0 = time.perf_counter()
    asr = _official_load(spec)
    t1 = time.perf_counter()
    n = spec["tokens"]
    asr.model.thinker.generation_config.min_new_tokens = n  # what transcribe() generates with
    res = asr.transcribe(audio=spec["audio"])
    done = time.time()
    return {
        "impl": "official",
        "config": "bf16",
        "done_epoch": done,
        "in_process_load_s": t1 - t0,
        "transcribe_s": time.perf_counter() - t1,
        "tokens": n,
        "peak_rss_mb": peak_rss_mb(),
        "text": res[0].text[:40],
        "loadavg": [loadavg()],
        "pressure": pressure.value(),
    }


def _cli_command(spec: dict) -> list[str]:
    """``mlx-asr transcribe`` of the short clip with the config's options (the venv's console script)."""
    script = Path(sys.executable).with_name("mlx-asr")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "mlx_asr.cli"]
    n = str(spec["tokens"])
    command += ["transcribe", "-m", spec["model"], "-a", spec["audio"], "--backend", "torch"]
    command += ["--device", _device(spec), "--max-new-tokens", n, "--min-new-tokens", n]
    if QUANT[spec["config"]] is not None:
        command += ["--quantize", str(QUANT[spec["config"]])]
    if spec["config"] in AUDIO_W8A8:
        command.append("--quantize-audio")
    if spec["config"] in DTYPE:
        command += ["--dtype", DTYPE[spec["config"]]]
    if spec.get("threads"):
        command += ["--threads", str(spec["threads"])]
    return command


def worker_ours_cli_cold(spec: dict) -> dict:
    """The command line as a user runs it: seconds until the transcript is printed, and until it exits."""
    pressure = Pressure()
    start = time.perf_counter()
    proc = subprocess.Popen(_cli_command(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    text = proc.stdout.readline()
    printed = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    exited = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"mlx-asr exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
    return {
        "impl": "ours (CLI)",
        "config": spec["config"],
        "wall_s": printed,
        "exit_s": exited,
        "tokens": spec["tokens"],
        "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,
        "text": text.strip()[:40],
        "loadavg": [loadavg()],
        "pressure": pressure.value(),
    }


WORKERS = {
    "ours-speed": worker_ours_speed,
    "ours-cold": worker_ours_cold,
    "ours-cli-cold": worker_ours_cli_cold,
    "ours-batch": worker_ours_batch,
    "official-speed": worker_official_speed,
    "official-cold": worker_official_cold,
}


# ---------------------------------------------------------------------------------------------- driver
def spawn(python: str, kind: str, spec: dict, env: dict, timeout: float = 1800) -> dict:
    """Run one worker in a fresh interpreter; its result, with ``wall_s`` from spawn to its last result."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"worker {kind} {spec.get('config')} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT ") :])
    if "done_epoch" in result:
        result["wall_s"] = result.pop("done_epoch") - start
    return result


def _pressure_of(result: dict) -> float:
    """The CPU pressure a measurement ran under (its worst batch size for batch results); 1 when unknown."""
    values = [row.get("pressure") for row in result.get("rows", [result])]
    known = [v for v in values if v is not None]
    return max(known) if len(known) == len(values) else 1.0


def wait_for_calm(max_pressure: float, longest: float = 600.0) -> None:
    """Wait (at most ``longest`` s) until the 10 s CPU pressure average is below ``max_pressure``."""
    deadline = time.time() + longest
    while time.time() < deadline:
        try:
            with open("/proc/pressure/cpu", encoding="ascii") as fh:
                avg10 = float(fh.readline().split()[1].split("=")[1]) / 100
        except (OSError, IndexError, ValueError):
            return
        if avg10 <= max_pressure:
            return
        time.sleep(2)


def measure(python: str, kind: str, spec: dict, env: dict, repeat: int, max_pressure: float | None, tries: int):
    """``repeat`` fresh-process results; with ``max_pressure``, runs that shared the CPU more are retried.

    Up to ``tries`` extra runs are made; then the ``repeat`` runs with the lowest CPU pressure are kept.
    """
    results = []
    while True:
        if max_pressure is not None:
            wait_for_calm(max_pressure)
        results.append(spawn(python, kind, spec, env))
        calm = [r for r in results if max_pressure is None or _pressure_of(r) <= max_pressure]
        if len(calm) >= repeat or len(results) >= repeat + tries:
            break
    return sorted(results, key=_pressure_of)[:repeat] if max_pressure is not None else results


def _median_of(results: list[dict]) -> dict:
    """Element-wise median of numeric fields over repeated fresh-process results (the rest from the first)."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = median([r[key] for r in results])
    out["repeats"] = len(results)
    return out


class Busy:
    """``count`` busy-looping processes that share the cores with the measurement (contention test)."""

    def __init__(self, count: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait()


def write_short_clip(audio: str, seconds: float, folder: str) -> str:
    """The first ``seconds`` of ``audio`` as a 16 kHz 16-bit WAV both sides can read."""
    import wave

    import numpy as np

    from mlx_asr.audio import load_audio

    samples = load_audio(audio)[: int(seconds * 16000)]
    path = os.path.join(folder, f"clip_{seconds:g}s.wav")
    with wave.open(path, "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(16000)
        fh.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    lines = []
    for model in report["models"]:
        name = model["name"]
        official = next((r for r in model["speed"] if r["impl"] == "official"), None)
        lines.append(
            f"\n#### {name} on {report.get('device', 'cpu')}: {report['audio_seconds']:.1f} s clip, "
            f"{report['tokens']} forced new tokens\n"
        )
        lines.append(
            "| impl | weights | load s | features s | encoder s | prefill s | decode ms/tok | total s | RTF "
            "| peak RSS MB | peak GPU MB | cold 1st transcript s | RTF vs official | CPU pressure |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in model["speed"]:
            cold = next(
                (
                    c
                    for c in model["cold"]
                    if c["impl"] == r["impl"] and c["config"] == r["config"] and c["tokens"] == report["cold_tokens"][0]
                ),
                None,
            )
            ratio = official["rtf"] / r["rtf"] if official else None
            lines.append(
                f"| {r['impl']} | {r['config']} | {fmt(r['load_s'], 2)} | {fmt(r['audio_s'] + r['features_s'])} "
                f"| {fmt(r['encoder_s'])} | {fmt(r['prefill_s'])} | {fmt(r['decode_ms_per_token'], 1)} "
                f"| {fmt(r['total_s'], 2)} | {fmt(r['rtf'])} | {r['peak_rss_mb']:.0f} "
                f"| {fmt(r.get('peak_device_mb'), 0)} "
                f"| {fmt(cold['wall_s'] if cold else None, 2)} | {f'{ratio:.2f}x' if ratio else '–'} "
                f"| {fmt(r.get('pressure'), 2)} |"
            )
        if model["cold"]:
            lines.append("\nCold start (fresh interpreter → first transcript of the short clip), by forced tokens:\n")
            lines.append(
                "| impl | weights | tokens | wall s | in-process load s | transcribe s | process exit s "
                "| peak RSS MB | CPU pressure |"
            )
            lines.append("|---|---|---|---|---|---|---|---|---|")
            for c in model["cold"]:
                lines.append(
                    f"| {c['impl']} | {c['config']} | {c['tokens']} | {fmt(c['wall_s'], 2)} "
                    f"| {fmt(c.get('in_process_load_s'), 2)} | {fmt(c.get('transcribe_s'), 2)} "
                    f"| {fmt(c.get('exit_s'), 2)} | {c['peak_rss_mb']:.0f} | {fmt(c.get('pressure'), 2)} |"
                )
        if model["batch"]:
            lines.append(
                f"\nBatch throughput ({model['batch'][0]['clips']} different 10 s clips, "
                f"{model['batch'][0]['tokens']} forced tokens each):\n"
            )
            lines.append(
                "| weights | batch size | seconds | clips/s | speed-up vs batch 1 | peak RSS MB | CPU pressure |"
            )
            lines.append("|---|---|---|---|---|---|---|")
            for b in model["batch"]:
                base = b["rows"][0]["clips_per_s"]
                for row in b["rows"]:
                    lines.append(
                        f"| {b['config']} | {row['batch_size']} | {fmt(row['seconds'], 2)} "
                        f"| {fmt(row['clips_per_s'], 3)} | {row['clips_per_s'] / base:.2f}x "
                        f"| {b['peak_rss_mb']:.0f} | {fmt(row.get('pressure'), 2)} |"
                    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="torch backend vs official qwen-asr: speed, memory, batch throughput")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument(
        "--model",
        action="append",
        help="checkpoint folder (repeat for several; default: benchmarks/models/0.6b-random)",
    )
    ap.add_argument(
        "--configs",
        default="bf16,int8,int4",
        help="our configs: bf16, fp16, fp32, int8, int4, w8a8, w8a8a (w8a8 + audio encoder); int4, w8a8: CPU only",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ours and the official package)")
    ap.add_argument("--official-python", help="python of a venv with qwen-asr==0.0.6 (skipped when not given)")
    ap.add_argument("--audio", default=str(AUDIO_10S))
    ap.add_argument("--tokens", type=int, default=40, help="forced new tokens per transcription")
    ap.add_argument("--runs", type=int, default=3, help="timed transcriptions per process (after a warm-up)")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per measurement (medians)")
    ap.add_argument("--short-seconds", type=float, default=1.0)
    ap.add_argument("--cold-tokens", default="40", help="forced tokens of the cold-start transcript(s), e.g. 16,40")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--batch-clips", type=int, default=8)
    ap.add_argument("--batch-configs", default="int8", help="our configs to measure batch throughput for")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed, cold, batch, official")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for our workers")
    ap.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for our workers (e.g. OMP_WAIT_POLICY=PASSIVE)"
    )
    ap.add_argument(
        "--max-pressure",
        type=float,
        default=None,
        help="retry a measurement whose CPU pressure (PSI: share of time a task waited for a CPU) was higher",
    )
    ap.add_argument("--tries", type=int, default=4, help="extra runs allowed by --max-pressure")
    ap.add_argument("--contention", type=int, default=0, help="busy-loop processes running during the measurements")
    ap.add_argument("--json", help="write the full report here")
    args = ap.parse_args(argv)

    if args.worker:
        emit(WORKERS[args.worker](json.loads(args.spec)))
        return 0

    sys.path.insert(0, str(ROOT))
    models = args.model or [str(ROOT / "benchmarks" / "models" / "0.6b-random")]
    configs = [c for c in args.configs.split(",") if c]
    skip = set(args.skip.split(","))
    cold_tokens = [int(t) for t in args.cold_tokens.split(",") if t]
    our_env = dict(os.environ)
    for item in args.env:
        key, _, value = item.partition("=")
        our_env[key] = value
    our_env["PYTHONPATH"] = str(ROOT) + os.pathsep + our_env.get("PYTHONPATH", "")
    official_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    official = args.official_python if args.official_python and "official" not in skip else None

    from mlx_asr.audio import load_audio

    seconds = load_audio(args.audio).shape[0] / 16000
    report = {
        "audio": args.audio,
        "audio_seconds": seconds,
        "tokens": args.tokens,
        "runs": args.runs,
        "repeat": args.repeat,
        "short_seconds": args.short_seconds,
        "cold_tokens": cold_tokens,
        "threads": args.threads,
        "env": args.env,
        "contention": args.contention,
        "cpus": os.cpu_count(),
        "device": args.device,
        "loadavg_start": loadavg(),
        "models": [],
    }
    busy = Busy(args.contention) if args.contention else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            short = write_short_clip(args.audio, args.short_seconds, tmp)
            for model in models:
                entry = {"name": Path(model).name, "path": model, "speed": [], "cold": [], "batch": []}
                report["models"].append(entry)
                base = {"model": model, "threads": args.threads, "runs": args.runs, "device": args.device}

                def run(python, kind, spec, env, entry_key, label, entry=entry):
                    results = measure(python, kind, spec, env, args.repeat, args.max_pressure, args.tries)
                    result = _median_of(results)
                    entry[entry_key].append(result)
                    brief = {
                        k: round(v, 3)
                        for k, v in result.items()
                        if k
                        in ("load_s", "encoder_s", "prefill_s", "decode_ms_per_token", "rtf", "wall_s", "peak_rss_mb")
                    }
                    print(
                        f"{entry['name']} {label}: {brief} cpu pressure {[_pressure_of(r) for r in results]}",
                        flush=True,
                    )

                if "speed" not in skip:
                    for config in configs:
                        spec = {**base, "config": config, "audio": args.audio, "tokens": args.tokens}
                        run(sys.executable, "ours-speed", spec, our_env, "speed", f"ours {config} speed")
                    if official:
                        spec = {**base, "config": "bf16", "audio": args.audio, "tokens": args.tokens}
                        run(official, "official-speed", spec, official_env, "speed", "official bf16 speed")
                if "cold" not in skip:
                    for tokens in cold_tokens:
                        for config in configs:
                            spec = {**base, "config": config, "audio": short, "tokens": tokens}
                            run(sys.executable, "ours-cold", spec, our_env, "cold", f"ours {config} cold {tokens} tok")
                            label = f"ours {config} CLI cold {tokens} tok"
                            run(sys.executable, "ours-cli-cold", spec, our_env, "cold", label)
                        if official:
                            spec = {**base, "config": "bf16", "audio": short, "tokens": tokens}
                            run(official, "official-cold", spec, official_env, "cold", f"official cold {tokens} tok")
                if "batch" not in skip:
                    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
                    for config in [c for c in args.batch_configs.split(",") if c]:
                        spec = {
                            **base,
                            "config": config,
                            "tokens": args.tokens,
                            "clips": args.batch_clips,
                            "batch_sizes": sizes,
                        }
                        run(sys.executable, "ours-batch", spec, our_env, "batch", f"ours {config} batch")
    finally:
        if busy:
            busy.stop()
    report["loadavg_end"] = loadavg()
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
