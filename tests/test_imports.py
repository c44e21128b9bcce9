"""Importing the package pulls in neither tensor library: each is needed only by its backend."""

from __future__ import annotations

import subprocess
import sys


def test_import_needs_neither_torch_nor_mlx():
    code = (
        "import sys, mlx_asr, mlx_asr.cli, mlx_asr.pipeline, mlx_asr.benchmark\n"
        "print(sorted(m for m in ('torch', 'mlx', 'mlx_lm', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_missing_backend_library_is_a_clear_error():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mlx_asr import AsrPipeline\n"
        "from mlx_asr.errors import BackendError\n"
        "try:\n"
        "    AsrPipeline.from_pretrained('tests/fixtures/tiny', backend='torch')\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch" in proc.stdout and "pip install" in proc.stdout
