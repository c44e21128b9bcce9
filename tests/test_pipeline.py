"""End to end through the public API, on both backends: the official text for every fixture case."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, CASES, TINY, get_case

from mlx_asr import AsrPipeline, cli
from mlx_asr import pipeline as pipeline_module
from mlx_asr.audio import load_audio
from mlx_asr.chunking import split_audio
from mlx_asr.errors import AudioError, LanguageError, ModelError
from mlx_asr.pipeline import Transcription

BACKENDS = ["mlx", "torch"]
STOP = {151643, 151645}


@pytest.fixture(scope="module", params=BACKENDS)
def pipe(request) -> AsrPipeline:
    return AsrPipeline.from_pretrained(TINY, backend=request.param, device="cpu", dtype="float32")


def _run(pipe: AsrPipeline, tag: str) -> Transcription:
    case = get_case(tag)
    return pipe.transcribe_detailed(case.audio, language=case.language, context=case.context, max_new_tokens=40)


def _official_tokens(tag: str) -> list[int]:
    ids = get_case(tag).generated_ids
    return ids[:-1] if ids and ids[-1] in STOP else ids


@pytest.mark.parametrize("tag", CASES)
def test_text_and_tokens_equal_official(pipe, tag):
    case = get_case(tag)
    result = _run(pipe, tag)
    assert result.tokens == _official_tokens(tag)
    assert result.text == case.meta["parsed_text"]
    assert result.language == case.meta["parsed_language"]
    assert result.stop_reason == case.meta["stop_reason"].replace("stop_token", "eos")
    assert result.duration == pytest.approx(case.meta["duration_s_16k"], abs=1e-6)


def test_backends_give_identical_tokens():
    pipes = [AsrPipeline.from_pretrained(TINY, backend=b, device="cpu", dtype="float32") for b in BACKENDS]
    for tag in CASES:
        mlx_result, torch_result = (_run(p, tag) for p in pipes)
        assert mlx_result.tokens == torch_result.tokens, tag
        assert mlx_result.confidence == pytest.approx(torch_result.confidence, abs=1e-3), tag


@pytest.mark.parametrize("freeze, enabled_before", [(False, True), (True, True), (False, False)])
def test_loading_pauses_the_garbage_collector(monkeypatch, freeze, enabled_before):
    seen, frozen = [], []
    real_create = pipeline_module.create_backend

    def create_backend(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_create(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "create_backend", create_backend)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    (gc.enable if enabled_before else gc.disable)()
    try:
        AsrPipeline.from_pretrained(TINY, backend="torch", device="cpu", freeze_gc=freeze)
        assert seen == [False] and gc.isenabled() == enabled_before and frozen == [True] * freeze
    finally:
        gc.enable()


def test_the_command_freezes_the_collector_after_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli, "OWNS_PROCESS", False)  # restored after the test
    events = []

    def load(cls, *args, **kwargs):
        events.append(gc.isenabled())
        raise ModelError("stop here")

    monkeypatch.setattr(AsrPipeline, "_load", classmethod(load))
    monkeypatch.setattr(gc, "freeze", lambda: events.append("frozen"))
    monkeypatch.setattr("sys.argv", ["mlx-asr", "transcribe", "-m", str(TINY), "-a", str(AUDIO / "short_2s.wav")])
    with pytest.raises(SystemExit):
        cli.main()
    assert events == [False, "frozen"] and "stop here" in capsys.readouterr().err


def test_detailed_result_fields(pipe):
    result = _run(pipe, "short_2s_wav")
    assert len(result.tokens) == 40 and result.pieces == 1
    assert 0.0 < result.confidence <= 1.0
    t = result.timings
    assert min(t.audio, t.features, t.encoder, t.prefill, t.decode) > 0.0
    assert result.rtf == pytest.approx(t.total / result.duration)
    assert result.tokens_per_second > 0
    data = json.loads(json.dumps(result.to_dict()))
    assert {"text", "language", "tokens", "duration", "timings", "rtf", "confidence"} <= set(data)
    assert data["tokens"] == result.tokens
    assert pipe.transcribe(get_case("short_2s_wav").audio, max_new_tokens=40) == result.text


def test_array_bytes_and_path_inputs_agree(pipe):
    path = AUDIO / "medium_10s_44k_stereo.flac"
    data, rate = sf.read(path, dtype="float32")
    by_path = pipe.transcribe_detailed(path, max_new_tokens=8)
    by_array = pipe.transcribe_detailed(data, sample_rate=rate, max_new_tokens=8)
    by_bytes = pipe.transcribe_detailed(path.read_bytes(), max_new_tokens=8)
    assert by_path.tokens == by_array.tokens == by_bytes.tokens


def test_min_new_tokens_forces_length(pipe):
    result = pipe.transcribe_detailed(AUDIO / "short_0p3s.wav", min_new_tokens=12, max_new_tokens=12)
    assert len(result.tokens) == 12 and result.stop_reason == "max_new_tokens"


def test_long_audio_is_cut_and_merged(pipe):
    path = AUDIO / "long_60s.flac"
    steps = []
    result = pipe.transcribe_detailed(
        path, chunk_seconds=25, max_new_tokens=6, progress=lambda done, total: steps.append((done, total))
    )
    assert result.pieces == 3 and steps == [(1, 3), (2, 3), (3, 3)]
    parts = [pipe.transcribe_detailed(p.samples, sample_rate=16000, max_new_tokens=6)
             for p in split_audio(load_audio(path), 25)]
    assert result.tokens == [t for p in parts for t in p.tokens]
    assert result.text == "".join(p.text for p in parts)
    assert result.duration == pytest.approx(sum(p.duration for p in parts), abs=1.0)


def test_batch_equals_one_by_one_and_keeps_failures(pipe, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    tags = ["short_2s_wav", "medium_10s_flac", "silence_1s_wav", "short_0p3s_wav", "medium_10s_mp3"]
    audios = [str(get_case(t).audio) for t in tags]
    audios.insert(2, str(broken))
    seen = []
    results = pipe.transcribe_batch(audios, batch_size=4, max_new_tokens=40, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(len(audios)))
    assert isinstance(results[2], AudioError) and "broken.wav" in str(results[2])
    good = [r for r in results if isinstance(r, Transcription)]
    for tag, result in zip(tags, good, strict=True):
        assert result.tokens == _official_tokens(tag), tag


def test_batch_with_chunked_long_audio(pipe):
    audios = [AUDIO / "long_60s.flac", AUDIO / "short_2s.wav"]
    results = pipe.transcribe_batch(audios, batch_size=2, max_new_tokens=5, chunk_seconds=30)
    assert results[0].pieces >= 2 and results[1].pieces == 1
    assert results[1].tokens == _official_tokens("short_2s_wav")[:5]


def test_forced_language_by_code(pipe):
    by_code = pipe.transcribe_detailed(AUDIO / "short_2s.wav", language="en", max_new_tokens=40)
    assert by_code.tokens == _official_tokens("short_2s_wav_lang_English")
    assert by_code.language == "English"


def test_bad_inputs_raise_typed_errors(pipe, tmp_path):
    with pytest.raises(LanguageError, match="Klingon"):
        pipe.transcribe(AUDIO / "short_2s.wav", language="Klingon")
    with pytest.raises(AudioError):
        pipe.transcribe(tmp_path / "missing.wav")
    with pytest.raises(AudioError):
        pipe.transcribe(np.zeros(0, dtype=np.float32), sample_rate=16000)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError):
        AsrPipeline.from_pretrained(tmp_path, backend="torch")
