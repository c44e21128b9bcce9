"""The example scripts run as documented on the shipped checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import AUDIO, TINY

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(script: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXAMPLES / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_transcribe_file():
    proc = run("transcribe_file.py", TINY, AUDIO / "short_2s.wav", "en")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "[English]" in proc.stderr and "RTF" in proc.stderr


def test_transcribe_file_reports_errors(tmp_path):
    proc = run("transcribe_file.py", TINY, tmp_path / "missing.wav")
    assert proc.returncode == 3 and proc.stderr.startswith("error: ")


def test_batch_folder(tmp_path):
    shutil.copy(AUDIO / "short_2s.wav", tmp_path / "a.wav")
    (tmp_path / "b.flac").write_bytes(b"broken")
    proc = run("batch_folder.py", TINY, tmp_path, 2)
    assert proc.returncode == 1
    assert proc.stdout.startswith("a.wav\t") and "b.flac\tERROR" in proc.stderr
