"""Transcribe one file and print the text, the detected language and the per-stage timings.

    python examples/transcribe_file.py MODEL AUDIO [LANGUAGE]

MODEL is an official Qwen3-ASR folder (or a converted one, or a Hugging Face repo id).
"""

from __future__ import annotations

import sys

from mlx_asr import AsrPipeline
from mlx_asr.errors import AsrError


def main(model: str, audio: str, language: str = "auto") -> int:
    try:
        pipe = AsrPipeline.from_pretrained(model)
        result = pipe.transcribe_detailed(audio, language=language)
    except AsrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(result.text)
    t = result.timings
    print(
        f"[{result.language or 'unknown language'}] {result.duration:.1f} s of audio in {t.total:.2f} s "
        f"(RTF {result.rtf:.3f}; encoder {t.encoder:.2f} s, prefill {t.prefill:.2f} s, "
        f"{result.tokens_per_second:.0f} tokens/s; confidence {result.confidence or 0:.2f})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
