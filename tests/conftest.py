"""Shared fixtures: the tiny official-layout checkpoint and the official reference dumps."""

from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
AUDIO = FIXTURES / "audio"
REFERENCE = FIXTURES / "reference"

# Reference dumps made by the official qwen-asr package (windowed encoder attention, float32, greedy).
CASES = [
    "short_2s_wav",
    "medium_10s_wav",
    "medium_10s_44k_stereo_wav",
    "medium_10s_flac",
    "medium_10s_mp3",
    "long_60s_wav",
    "silence_1s_wav",
    "short_0p3s_wav",
    "short_2s_wav_lang_English",
    "short_2s_wav_context",
]
# Dumps whose audio we keep as lossless FLAC to save space (the samples are identical).
_AUDIO_RENAMES = {
    "long_60s.wav": "long_60s.flac",
    "medium_10s.wav": "medium_10s.flac",
    "medium_10s_44k_stereo.wav": "medium_10s_44k_stereo.flac"}


class Case:
    """One reference dump: its json metadata, its tensors and the audio it was made from."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.meta = json.loads((REFERENCE / f"{tag}.json").read_text(encoding="utf-8"))
        self._tensors_file = REFERENCE / self.meta.get("tensors_file", f"{tag}.safetensors")

    @property
    def audio(self) -> Path:
        name = self.meta["audio"]
        return AUDIO / _AUDIO_RENAMES.get(name, name)

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        return _load_tensors(self._tensors_file)

    @property
    def language(self) -> str | None:
        return self.meta["forced_language"]

    @property
    def context(self) -> str:
        return self.meta["context"] or ""

    @property
    def generated_ids(self) -> list[int]:
        return [int(t) for t in self.meta["generated_ids"]]

    def __repr__(self) -> str:
        return self.tag


@lru_cache(maxsize=4)
def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


@cache
def get_case(tag: str) -> Case:
    return Case(tag)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max absolute error relative to the largest reference magnitude."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


@pytest.fixture(params=CASES, ids=CASES)
def case(request) -> Case:
    return get_case(request.param)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY
