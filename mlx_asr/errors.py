"""Typed exceptions raised by mlx-asr. Every one carries a single human-readable line."""

from __future__ import annotations


class AsrError(Exception):
    """Base class of every error mlx-asr raises on bad input or environment."""

    exit_code = 1


class AudioError(AsrError):
    """The audio could not be read: missing, not audio, corrupt, empty."""

    exit_code = 3


class ModelError(AsrError):
    """The model folder is missing, incomplete, or not a Qwen3-ASR checkpoint."""

    exit_code = 4


class LanguageError(AsrError):
    """An unknown language name or code was requested."""

    exit_code = 5


class BackendError(AsrError):
    """The requested backend or device is not available on this machine."""

    exit_code = 6
