"""Parity on a second official checkpoint (head_dim 64, one KV head, other sizes) and unseen audio."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import LONG_VARIANT_REPEATS, VARIANT, variant_audio

from mlx_asr import AsrPipeline

TAGS = sorted(p.stem for p in (VARIANT / "reference").glob("*.json"))
STOP = {151643, 151645}


def meta(tag: str) -> dict:
    return json.loads((VARIANT / "reference" / f"{tag}.json").read_text(encoding="utf-8"))


def test_regenerated_weights_are_the_official_ones(variant_model):
    assert len(TAGS) == 8
    digest = hashlib.sha256((variant_model / "model.safetensors").read_bytes()).hexdigest()
    assert digest == json.loads((VARIANT / "weights.json").read_text())["sha256"]


@pytest.fixture(scope="module", params=["torch", "mlx"])
def pipe(request, variant_model) -> AsrPipeline:
    return AsrPipeline.from_pretrained(variant_model, backend=request.param, device="cpu", dtype="float32")


@pytest.mark.parametrize("tag", TAGS)
def test_tokens_and_text_equal_official(pipe, tag):
    m = meta(tag)
    audio = variant_audio(m)
    kwargs = {"sample_rate": audio[1]} if isinstance(audio, tuple) else {}
    result = pipe.transcribe_detailed(
        audio[0] if isinstance(audio, tuple) else audio,
        language=m["forced_language"], context=m["context"] or "", max_new_tokens=40, **kwargs,
    )
    ids = [int(t) for t in m["generated_ids"]]
    assert round(result.duration * 16000) == m["num_samples_16k"]
    assert result.tokens == (ids[:-1] if ids[-1] in STOP else ids)
    assert result.text == m["parsed_text"]
    assert result.language == m["parsed_language"]


@pytest.mark.parametrize("language", ["auto", "Chinese"])
def test_audio_over_the_limit_is_split_and_merged_as_official(variant_model, language):
    """The official transcribe() on 21 minutes: two pieces cut at the quietest point, texts joined."""
    ref = json.loads((VARIANT / "transcribe_api" / "long_21m.json").read_text(encoding="utf-8"))
    samples, rate = variant_audio({"audio": "long_18m.wav"})
    samples = np.concatenate([samples, samples[: len(samples) // LONG_VARIANT_REPEATS * 11]])
    pipe = AsrPipeline.from_pretrained(variant_model, backend="torch", device="cpu", dtype="float32")
    result = pipe.transcribe_detailed(samples, sample_rate=rate, language=language, max_new_tokens=40)
    expected = ref["results"][language]
    assert result.pieces == 2
    assert result.text == expected["text"] and result.language == expected["language"]
