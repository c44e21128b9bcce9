"""End-to-end tests of the installed ``mlx-asr`` console script, each run in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, TINY, get_case

from mlx_asr.benchmark import format_report

SCRIPT = Path(sys.executable).with_name("mlx-asr")
SHORT = AUDIO / "short_2s.wav"
OFFICIAL_SHORT = get_case("short_2s_wav").meta["parsed_text"]


def cli(
    *args: str | Path, stdin: bytes | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], input=stdin, capture_output=True, env=env, cwd=cwd, timeout=300
    )


def out(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.decode("utf-8")


def err(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.decode("utf-8")


def test_script_is_installed():
    assert SCRIPT.exists(), "pip install -e . installs the mlx-asr console script"


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_transcribe_prints_the_official_text(backend):
    proc = cli("transcribe", "-m", TINY, "-a", SHORT, "--backend", backend, "--max-new-tokens", "40",
               "--dtype", "float32")
    assert proc.returncode == 0, err(proc)
    assert out(proc) == OFFICIAL_SHORT + "\n"
    assert err(proc) == ""


def test_json_output_has_metadata(tmp_path):
    target = tmp_path / "out.json"
    proc = cli("transcribe", "-m", TINY, "-a", SHORT, "--max-new-tokens", "40", "--format", "json",
               "-o", target, "--backend", "torch", "--dtype", "float32", "--verbose")
    assert proc.returncode == 0, err(proc)
    assert out(proc) == ""
    assert "rtf" in err(proc) and "tok/s" in err(proc)
    data = json.loads(target.read_text(encoding="utf-8"))
    assert data["text"] == OFFICIAL_SHORT
    assert data["tokens"] == get_case("short_2s_wav").generated_ids
    assert data["backend"] == "torch" and data["device"] == "cpu" and data["dtype"] == "float32"
    assert 0 < data["confidence"] <= 1 and data["duration"] == pytest.approx(2.085, abs=1e-3)
    assert {"features", "encoder", "prefill", "decode"} <= set(data["timings"]) and data["rtf"] > 0


def _hub_cache(tmp_path: Path, repo: str) -> dict[str, str]:
    """A Hugging Face cache holding the tiny checkpoint as ``repo`` (laid out as a download leaves it), and the
    environment that points the hub client at it."""
    revision = "0" * 40
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in TINY.iterdir():
        (snapshot / file.name).symlink_to(file.resolve())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return {"HF_HUB_CACHE": str(tmp_path / "hub")}


def test_repo_id_is_read_from_the_hub_cache_offline(tmp_path):
    env = _hub_cache(tmp_path, "Qwen/Qwen3-ASR-tiny")
    proc = cli("transcribe", "-m", "Qwen/Qwen3-ASR-tiny", "-a", SHORT, "--backend", "torch", "--max-new-tokens", "40",
               "--dtype", "float32", env=env)
    assert proc.returncode == 0, err(proc)
    assert out(proc) == OFFICIAL_SHORT + "\n"


def test_convert_a_repo_id_from_the_hub_cache(tmp_path):
    env = _hub_cache(tmp_path, "Qwen/Qwen3-ASR-tiny")
    target = tmp_path / "converted"
    proc = cli("convert", "Qwen/Qwen3-ASR-tiny", "-o", target, "--quantize", "8", env=env)
    assert proc.returncode == 0, err(proc)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    assert config["mlx_asr"]["source"] == "Qwen/Qwen3-ASR-tiny"
    assert "Qwen/Qwen3-ASR-tiny" in (target / "README.md").read_text(encoding="utf-8")
    assert str(tmp_path) not in (target / "README.md").read_text(encoding="utf-8")
    proc = cli("transcribe", "-m", target, "-a", SHORT, "--max-new-tokens", "8")
    assert proc.returncode == 0, err(proc)
    assert out(proc).strip()


QUANTIZE_OPTIONS = [["--quantize", "8"], ["--quantize", "W8A8"], ["--quantize", "w8a8", "--quantize-audio"]]


@pytest.mark.parametrize("options", QUANTIZE_OPTIONS)
def test_quantize_at_load(options):
    proc = cli("transcribe", "-m", TINY, "-a", SHORT, "--backend", "torch", *options)
    assert proc.returncode == 0, err(proc)
    assert out(proc).strip()


def test_stdin_and_several_files():
    proc = cli("transcribe", "-m", TINY, "-a", "-", AUDIO / "short_0p3s.wav", "--max-new-tokens", "4",
               stdin=SHORT.read_bytes())
    assert proc.returncode == 0, err(proc)
    lines = out(proc).splitlines()
    assert [line.split("\t")[0] for line in lines] == ["-", str(AUDIO / "short_0p3s.wav")]


def test_normalize_and_forced_language():
    proc = cli("transcribe", "-m", TINY, "-a", SHORT, "--max-new-tokens", "40", "--language", "en",
               "--normalize", "--format", "json")
    assert proc.returncode == 0, err(proc)
    data = json.loads(out(proc))
    assert data["language"] == "English"
    assert data["text"] == data["text"].lower() and "," not in data["text"]


def test_one_bad_file_among_several_is_reported(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    proc = cli("transcribe", "-m", TINY, SHORT, bad, "--max-new-tokens", "3")
    assert proc.returncode == 7
    assert out(proc).startswith(str(SHORT) + "\t")
    assert "bad.wav" in err(proc) and "Traceback" not in err(proc)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(SHORT, folder / "a.wav")
    shutil.copy(AUDIO / "short_0p3s.wav", folder / "b.wav")
    shutil.copy(AUDIO / "medium_10s.mp3", folder / "sub" / "c.mp3")
    (folder / "corrupt.flac").write_bytes((AUDIO / "medium_10s.flac").read_bytes()[:2000])
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_batch_with_corrupt_file_then_resume(tmp_path):
    folder, results = _folder(tmp_path), tmp_path / "results.jsonl"
    proc = cli("batch", "-m", TINY, "-i", folder, "-r", "-o", results, "--batch-size", "2", "--max-new-tokens", "40")
    assert proc.returncode == 7, err(proc)
    rows = {Path(r["file"]).name: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(rows) == {"a.wav", "b.wav", "c.mp3", "corrupt.flac"}
    assert "error" in rows["corrupt.flac"] and "corrupt.flac" in rows["corrupt.flac"]["error"]
    assert rows["a.wav"]["text"] == OFFICIAL_SHORT
    assert "3 transcribed, 1 failed" in err(proc)

    (folder / "corrupt.flac").unlink()
    shutil.copy(SHORT, folder / "d.wav")
    again = cli("batch", "-m", TINY, "-i", folder, "-r", "-o", results, "--resume", "--max-new-tokens", "40")
    assert again.returncode == 0, err(again)
    assert "1 transcribed, 0 failed, 3 skipped" in err(again)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in rows) == ["a.wav", "b.wav", "c.mp3", "d.wav"]


def test_batch_json_output_without_recursion(tmp_path):
    folder, results = _folder(tmp_path), tmp_path / "results.json"
    proc = cli("batch", "-m", TINY, "-i", folder, "-o", results, "--max-new-tokens", "2", "--backend", "mlx")
    assert proc.returncode == 7
    rows = json.loads(results.read_text())
    assert sorted(Path(r["file"]).name for r in rows) == ["a.wav", "b.wav", "corrupt.flac"]


def test_benchmark_on_a_tiny_test_set(tmp_path):
    speaker = tmp_path / "set" / "19" / "198"
    speaker.mkdir(parents=True)
    shutil.copy(SHORT, speaker / "19-198-0000.wav")
    (speaker / "19-198.trans.txt").write_text(f"19-198-0000 {OFFICIAL_SHORT.upper()}\n")
    exact = cli("benchmark", "-m", TINY, "--test-set", tmp_path / "set", "--max-new-tokens", "40", "--json")
    assert exact.returncode == 0, err(exact)
    assert json.loads(out(exact))["wer"] == 0.0

    sf.write(speaker / "19-198-0001.flac", np.zeros(8000, dtype=np.float32), 16000)
    (speaker / "19-198.trans.txt").write_text(f"19-198-0000 {OFFICIAL_SHORT.upper()}\n19-198-0001 HELLO WORLD\n")
    manifest = tmp_path / "set.jsonl"
    manifest.write_text(json.dumps({"audio": str(speaker / "19-198-0000.wav"), "text": "something else"}) + "\n")
    for test_set in (tmp_path / "set", manifest):
        proc = cli("benchmark", "-m", TINY, "--test-set", test_set, "--max-new-tokens", "40", "--json")
        assert proc.returncode == 0, err(proc)
        report = json.loads(out(proc))
        assert report["failed"] == [] and report["wer"] > 0.5


def test_benchmark_speed_mode():
    proc = cli("benchmark", "-m", TINY, "--synthetic", "--lengths", "1,2", "--runs", "1", "--min-new-tokens", "5",
               "--max-new-tokens", "5", "--stress", "3")
    assert proc.returncode == 0, err(proc)
    text = out(proc)
    assert "rtf" in text.lower() and "load" in text.lower() and "stress" in text.lower()
    quantized = cli("benchmark", "-m", TINY, "--synthetic", "--lengths", "1", "--runs", "1", "--max-new-tokens", "3",
                    "--backend", "torch", "--quantize", "w8a8", "--quantize-audio", "--json")
    assert quantized.returncode == 0, err(quantized)
    report = json.loads(out(quantized))
    assert report["quantize"] == "w8a8" and report["quantize_audio"] is True
    assert report["peak_device_mb"] is None  # the CPU
    assert 1 <= report["cpu_threads"] <= (os.cpu_count() or 1)
    assert f"{report['cpu_threads']} CPU thread(s)" in format_report(report)
    gpu = format_report({**report, "device": "cuda", "peak_device_mb": 1234.5, "cpu_threads": None})
    assert "peak device memory 1234 MB" in gpu and "device memory" not in format_report(report)
    assert "CPU thread" not in gpu


def test_info():
    proc = cli("info", "-m", TINY, "--json")
    assert proc.returncode == 0, err(proc)
    data = json.loads(out(proc))
    assert data["dtype"] == "float32" and data["encoder"]["layers"] == 2 and data["quantization"] is None
    assert "English" in cli("info", "-m", TINY).stdout.decode()


def test_help_for_every_command():
    for command in ["transcribe", "batch", "benchmark", "info"]:
        proc = cli(command, "--help")
        assert proc.returncode == 0 and "Example" in out(proc), command


def _broken_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "not_audio.wav").write_text("hello")
    (tmp_path / "corrupt.flac").write_bytes((AUDIO / "medium_10s.flac").read_bytes()[:3000])
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    (tmp_path / "incomplete").mkdir()
    shutil.copy(TINY / "config.json", tmp_path / "incomplete" / "config.json")
    return {name: tmp_path / name for name in ["not_audio.wav", "corrupt.flac", "empty.wav", "incomplete"]}


ERROR_CASES = [
    # (name, arguments after "transcribe", exit code, words in the message)
    ("missing file", ["-m", TINY, "-a", "missing.wav"], 3, "file not found"),
    ("folder as file", ["-m", TINY, "-a", AUDIO], 3, "is a folder"),
    ("not audio", ["-m", TINY, "-a", "{not_audio.wav}"], 3, "not a readable audio file"),
    ("corrupt audio", ["-m", TINY, "-a", "{corrupt.flac}"], 3, "corrupt.flac"),
    ("empty audio", ["-m", TINY, "-a", "{empty.wav}"], 3, "empty audio"),
    ("unknown language", ["-m", TINY, "-a", SHORT, "--language", "Klingon"], 5, "English (en)"),
    ("missing model", ["-m", "no/such/folder", "-a", SHORT], 4, "not found"),
    ("incomplete model", ["-m", "{incomplete}", "-a", SHORT], 4, "safetensors"),
    ("offline repo id", ["-m", "Qwen/Qwen3-ASR-0.6B", "-a", SHORT], 4, "Hugging Face"),
    ("metal without Metal", ["-m", TINY, "-a", SHORT, "--device", "metal"], 6, "Metal"),
    ("cuda without CUDA", ["-m", TINY, "-a", SHORT, "--backend", "torch", "--device", "cuda"], 6, "CUDA"),
    ("conflicting options", ["-m", TINY, "-a", SHORT, "--backend", "mlx", "--device", "cuda"], 6, "torch backend"),
    ("two stdin", ["-m", TINY, "-a", "-", "-a", "-"], 2, "only once"),
    ("no audio", ["-m", TINY], 2, "no audio"),
    ("bad format", ["-m", TINY, "-a", SHORT, "--format", "xml"], 2, "txt or json"),
    ("bad dtype", ["-m", TINY, "-a", SHORT, "--dtype", "float64"], 6, "float32"),
    ("bad quantize", ["-m", TINY, "-a", SHORT, "--backend", "torch", "--quantize", "3"], 6, "8, 4 or w8a8"),
    ("w8a8 on mlx", ["-m", TINY, "-a", SHORT, "--backend", "mlx", "--quantize", "w8a8"], 6, "torch CPU backend"),
    ("audio w8a8 on mlx", ["-m", TINY, "-a", SHORT, "--backend", "mlx", "--quantize-audio"], 6, "quantize_audio"),
]


@pytest.mark.parametrize(("name", "args", "code", "words"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_gets_one_line_and_exit_code(tmp_path, name, args, code, words):
    paths = _broken_inputs(tmp_path)
    args = [paths[a[1:-1]] if isinstance(a, str) and a.startswith("{") else a for a in args]
    proc = cli("transcribe", *args, stdin=b"")
    message = err(proc)
    if name == "metal without Metal" and proc.returncode == 0:
        pytest.skip("this machine has Metal")
    assert proc.returncode == code, message
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) == 1 and message.startswith("mlx-asr: error: "), message
    assert words in message
    assert out(proc) == ""


def test_batch_errors(tmp_path):
    missing = cli("batch", "-m", TINY, "-i", tmp_path / "nope")
    assert missing.returncode == 3 and "folder not found" in err(missing)
    as_file = cli("batch", "-m", TINY, "-i", SHORT)
    assert as_file.returncode == 3 and "expected a folder" in err(as_file)
    bad_out = cli("batch", "-m", TINY, "-i", tmp_path, "-o", tmp_path / "r.csv")
    assert bad_out.returncode == 2 and ".jsonl" in err(bad_out)
    nothing = cli("batch", "-m", TINY, "-i", tmp_path, "-o", tmp_path / "r.jsonl")
    assert nothing.returncode == 0 and "nothing to do" in err(nothing)


def test_benchmark_needs_one_mode():
    proc = cli("benchmark", "-m", TINY)
    assert proc.returncode == 2 and "--synthetic" in err(proc)
