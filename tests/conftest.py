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


def check_encode_batch(backend) -> None:
    """``backend.encode_batch`` of fixture mels of 0.3-60 s equals ``encode`` of each (relative error <= 1e-5)."""
    names = ("medium_10s_wav", "short_0p3s_wav", "long_60s_wav", "short_2s_wav")
    mels = [get_case(name).tensors["mel"] for name in names]
    together = backend.encode_batch(mels)
    assert len(together) == len(mels)
    for mel, embeds in zip(mels, together, strict=True):
        alone = backend.to_numpy(backend.encode(mel))
        assert backend.to_numpy(embeds).shape == alone.shape
        assert rel_err(backend.to_numpy(embeds), alone) <= 1e-5


@pytest.fixture(params=CASES, ids=CASES)
def case(request) -> Case:
    return get_case(request.param)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


# ---------------------------------------------------------------------------------------------- variant
VARIANT = FIXTURES / "variant"
VARIANT_AUDIO = {
    "zh_16k.wav": "zh_16k.flac",
    "lead_sil_48k_24bit.wav": "lead_sil_48k_24bit.flac",
}
LONG_VARIANT_REPEATS = 85  # long_18m.wav is zh_en_13s repeated this many times


def build_variant_checkpoint(out: Path) -> Path:
    """Regenerate the variant checkpoint's weights bit for bit (see fixtures/variant/README.md)."""
    import math
    import shutil

    import torch
    from safetensors.torch import save_file

    spec = json.loads((VARIANT / "weights.json").read_text())
    gen = torch.Generator().manual_seed(spec["seed"])
    tensors = {}
    for name, shape in sorted(spec["tensors"].items()):
        noise = torch.randn(shape, generator=gen)
        if name.endswith("embed_tokens.weight"):
            tensors[name] = noise
        elif len(shape) >= 2:
            gain = 1.0
            if name.startswith("thinker.model.") and name.endswith("o_proj.weight"):
                gain = 0.5
            if name.startswith("thinker.model.") and name.endswith("down_proj.weight"):
                gain = 2.0
            tensors[name] = noise * (gain / math.sqrt(math.prod(shape[1:])))
        elif name == "thinker.model.norm.weight":
            tensors[name] = 2.0 * noise
        elif "norm" in name and name.endswith("weight"):
            tensors[name] = 1.0 + 0.1 * noise
        else:
            tensors[name] = 0.05 * noise
    if spec["lm_head_copies_embed_tokens"]:
        tensors["thinker.lm_head.weight"] = tensors["thinker.model.embed_tokens.weight"].clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(VARIANT / "config.json", out / "config.json")
    for item in TINY.iterdir():
        if item.suffix in (".json", ".txt") and item.name != "config.json":
            shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="session")
def variant_model(tmp_path_factory) -> Path:
    return build_variant_checkpoint(tmp_path_factory.mktemp("variant") / "model")


def variant_audio(meta: dict):
    """The audio a variant reference was made from: a path, or (samples, rate) for the long one."""
    name = meta["audio"]
    if name == "long_18m.wav":
        import soundfile as sf

        samples, rate = sf.read(VARIANT / "audio" / "zh_en_13s.flac", dtype="float32")
        return np.tile(samples, LONG_VARIANT_REPEATS), rate
    return VARIANT / "audio" / VARIANT_AUDIO.get(name, name)


# ---------------------------------------------------------------------------------------------- trained
TRAINED = FIXTURES / "trained"  # made by fixtures/make_trained.py


def build_trained_checkpoint(out: Path) -> Path:
    """The tiny checkpoint fine-tuned to transcribe the reference cases (fixtures/trained/patch.safetensors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(TINY / "model.safetensors"))
    patch = load_file(str(TRAINED / "patch.safetensors"))
    rows, values = patch.pop("trained.embed_rows"), patch.pop("trained.embed_values")
    tensors.update(patch)
    tensors["thinker.model.embed_tokens.weight"][rows] = values
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for item in TINY.iterdir():
        if item.suffix in (".json", ".txt"):
            shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    return build_trained_checkpoint(tmp_path_factory.mktemp("trained") / "model")


def trained_targets() -> dict[str, str]:
    """Each reference case's answer the trained checkpoint was fine-tuned to give (raw, special tags kept)."""
    return json.loads((TRAINED / "targets.json").read_text(encoding="utf-8"))
