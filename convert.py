#!/usr/bin/env python3
"""Convert an official Qwen3-ASR folder (or Hugging Face repo id) into an MLX model folder.

Same as ``mlx-asr convert``:

    python convert.py ./Qwen3-ASR-1.7B -o ./Qwen3-ASR-1.7B-mlx-4bit --quantize 4
    python convert.py --help
"""

import sys

from mlx_asr.cli import app

if __name__ == "__main__":
    app(["convert", *sys.argv[1:]], prog_name="convert.py")
