"""Quantization keeps every token of a model whose choices are confident, as a trained model's are.

The tiny random checkpoint's greedy choices win by tiny logit margins (often under 0.1), so lossy
quantization flips some of them there (see ``test_convert.py``). ``fixtures/make_trained.py`` fine-tuned
it to transcribe the reference cases until every chosen token won by at least 4 logits; the official
qwen-asr package gives the same transcripts on it (checked when the patch was made, not in CI). Here
every quantized variant of both backends must reproduce the float32 tokens on every case.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import CASES, get_case, trained_targets

from mlx_asr import AsrPipeline
from mlx_asr.convert import convert
from mlx_asr.quantize import QuantPolicy

MAX_NEW_TOKENS = 40


def _transcripts(pipe: AsrPipeline) -> dict[str, list[int]]:
    """Greedy tokens (the stop token excluded) of every reference case, each of which must end on its own."""
    tokens = {}
    for tag in CASES:
        case = get_case(tag)
        result = pipe.transcribe_detailed(case.audio, language=case.language, context=case.context,
                                          max_new_tokens=MAX_NEW_TOKENS)
        assert result.stop_reason == "eos", tag
        tokens[tag] = result.tokens
    return tokens


@cache
def _float32(folder: Path, backend: str) -> dict[str, list[int]]:
    return _transcripts(AsrPipeline.from_pretrained(folder, backend=backend, dtype="float32"))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_trained_model_transcribes_its_cases(trained_model: Path, backend: str) -> None:
    pipe = AsrPipeline.from_pretrained(trained_model, backend=backend, dtype="float32")
    targets = trained_targets()
    for tag, tokens in _float32(trained_model, backend).items():
        assert pipe.tokenizer.decode(tokens) == targets[tag], tag
    assert _float32(trained_model, "mlx") == _float32(trained_model, "torch")


@pytest.fixture(scope="module")
def converted(trained_model: Path, tmp_path_factory) -> Callable[[int], Path]:
    """The trained checkpoint converted at ``bits`` (float32, group 32), once per bit width."""

    @cache
    def folder(bits: int) -> Path:
        out = tmp_path_factory.mktemp("trained-converted") / f"q{bits}"
        convert(trained_model, out, dtype="float32", policy=QuantPolicy(bits, group_size=32), progress=False)
        return out

    return folder


@pytest.mark.parametrize("bits", [8, 4])
def test_mlx_quantized_keeps_every_token(trained_model: Path, converted, bits: int) -> None:
    pipe = AsrPipeline.from_pretrained(converted(bits), backend="mlx")
    assert pipe.backend.name == "mlx"
    assert _transcripts(pipe) == _float32(trained_model, "mlx")


@pytest.mark.parametrize(("quantize", "quantize_audio"), [(8, False), (4, False), ("w8a8", False), ("w8a8", True)])
def test_torch_quantized_keeps_every_token(trained_model: Path, quantize, quantize_audio: bool) -> None:
    from mlx_asr.backends.torch.quant import dynamic_int8_available

    if quantize == "w8a8" and not dynamic_int8_available():
        pytest.skip("w8a8 needs fbgemm (an x86 PyTorch build)")
    pipe = AsrPipeline.from_pretrained(trained_model, backend="torch", dtype="float32", quantize=quantize,
                                       quantize_audio=quantize_audio)
    assert _transcripts(pipe) == _float32(trained_model, "torch")


def _first_logits(pipe: AsrPipeline, tag: str) -> np.ndarray:
    case = get_case(tag)
    embeds = pipe.backend.encode(case.tensors["mel"])
    return np.asarray(pipe.backend.first_logits(case.tensors["prompt_ids"].tolist(), embeds), dtype=np.float64)


@pytest.mark.parametrize(("bits", "min_cosine"), [(8, 0.999), (4, 0.97)])
def test_first_step_logits_stay_close(trained_model: Path, converted, bits: int, min_cosine: float,
                                      record_property) -> None:
    float32 = AsrPipeline.from_pretrained(trained_model, backend="mlx", dtype="float32")
    quantized = AsrPipeline.from_pretrained(converted(bits), backend="mlx")
    worst = 1.0
    for tag in CASES:
        a, b = _first_logits(float32, tag), _first_logits(quantized, tag)
        worst = min(worst, float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    record_property(f"min_cosine_{bits}bit", round(worst, 6))
    assert worst >= min_cosine
