"""Transcribe every .wav/.flac/.mp3 of a folder in batches and write a tab-separated table.

    python examples/batch_folder.py MODEL FOLDER [BATCH_SIZE]

Results arrive in input order; a file that cannot be read is reported and the others go on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlx_asr import AsrPipeline, Transcription


def main(model: str, folder: str, batch_size: str = "4") -> int:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".wav", ".flac", ".mp3"))
    pipe = AsrPipeline.from_pretrained(model)
    failed = 0
    for path, result in zip(files, pipe.transcribe_batch(files, batch_size=int(batch_size)), strict=True):
        if isinstance(result, Transcription):
            print(f"{path.name}\t{result.language}\t{result.text}")
        else:
            failed += 1
            print(f"{path.name}\tERROR\t{result}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
