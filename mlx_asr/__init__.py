"""mlx-asr: Qwen3-ASR speech recognition on MLX (Apple Silicon) and PyTorch (CPU, CUDA).

>>> from mlx_asr import AsrPipeline                          # doctest: +SKIP
>>> pipe = AsrPipeline.from_pretrained("path/to/Qwen3-ASR-0.6B")
>>> pipe.transcribe("speech.wav")
"""

from .audio import load_audio
from .errors import AsrError, AudioError, BackendError, LanguageError, ModelError
from .languages import LANGUAGES
from .pipeline import AsrPipeline, Timings, Transcription

__version__ = "0.1.0"

__all__ = [
    "LANGUAGES",
    "AsrError",
    "AsrPipeline",
    "AudioError",
    "BackendError",
    "LanguageError",
    "ModelError",
    "Timings",
    "Transcription",
    "load_audio",
]
