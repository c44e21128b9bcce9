"""Parity on a second official checkpoint (head_dim 64, one KV head, other sizes) and unseen audio."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import VARIANT, variant_audio

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
