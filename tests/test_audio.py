"""Audio input: formats, rates, channels, arrays, bytes and every bad-input error."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, CASES, get_case

from mlx_asr.audio import load_audio, normalize, resample
from mlx_asr.errors import AudioError


@pytest.mark.parametrize("tag", CASES)
def test_sample_count_matches_official(tag):
    case = get_case(tag)
    samples = load_audio(case.audio)
    assert samples.dtype == np.float32
    assert samples.shape == (case.meta["num_samples_16k"],)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "PCM_U8"])
def test_wav_subtypes_decode_to_the_same_signal(tmp_path, subtype):
    ref, rate = sf.read(AUDIO / "short_2s.wav", dtype="float32")
    path = tmp_path / f"clip_{subtype}.wav"
    sf.write(path, ref, rate, subtype=subtype)
    out = load_audio(path)
    tol = 1e-2 if subtype == "PCM_U8" else 1e-4
    assert out.shape == ref.shape and np.abs(out - ref).max() < tol


def test_ogg_vorbis_and_stereo_44k_wav(tmp_path):
    ref = load_audio(AUDIO / "medium_10s_44k_stereo.flac")
    data, rate = sf.read(AUDIO / "medium_10s_44k_stereo.flac", dtype="int16")
    wav = tmp_path / "stereo44k.wav"
    sf.write(wav, data, rate, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(wav), ref)
    ogg = tmp_path / "clip.ogg"
    sf.write(ogg, data, rate, format="OGG", subtype="VORBIS")
    out = load_audio(ogg)
    assert abs(out.shape[0] - ref.shape[0]) <= 2


def test_bytes_array_and_tuple_inputs_agree():
    path = AUDIO / "short_2s.wav"
    ref = load_audio(path)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), ref)
    data, rate = sf.read(path, dtype="float32")
    np.testing.assert_array_equal(load_audio(data, sample_rate=rate), ref)
    np.testing.assert_array_equal(load_audio((data, rate)), ref)
    int16, _ = sf.read(path, dtype="int16")
    np.testing.assert_array_equal(load_audio((int16, rate)), ref)


def test_channels_first_and_last_arrays_downmix_by_mean():
    left = np.linspace(-0.5, 0.5, 16000, dtype=np.float32)
    right = np.zeros_like(left)
    expected = (left + right) / 2
    np.testing.assert_allclose(load_audio((np.stack([left, right]), 16000)), expected)
    np.testing.assert_allclose(load_audio((np.stack([left, right], axis=1), 16000)), expected)


def test_resample_length_follows_librosa():
    x = np.random.default_rng(0).standard_normal(44101).astype(np.float32) * 0.1
    assert resample(x[:44100], 44100).shape == (16000,)
    assert resample(x, 44100).shape == (16001,)  # ceil(44101 * 16000 / 44100)
    assert resample(x, 16000) is x


def test_peak_normalisation():
    loud = np.array([0.5, -4.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(normalize(loud), [0.125, -1.0, 0.5])
    quiet = np.array([0.5, -0.25], dtype=np.float32)
    np.testing.assert_array_equal(normalize(quiet), quiet)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.wav", "file not found"),
        (lambda p: p, "is a folder"),
        (lambda p: _write(p / "empty.wav", b""), "empty file"),
        (lambda p: _write(p / "text.wav", b"hello, I am not audio at all" * 10), "not a readable audio file"),
        (lambda p: _write(p / "cut.wav", (AUDIO / "short_2s.wav").read_bytes()[:30]), "audio"),
        (lambda p: _empty_wav(p / "zero.wav"), "empty audio"),
    ],
    ids=["missing", "folder", "empty-file", "not-audio", "truncated-header", "no-samples"],
)
def test_bad_files_raise_audio_error(tmp_path, make, message):
    with pytest.raises(AudioError, match=message):
        load_audio(make(tmp_path))


def test_bad_arrays_raise_audio_error():
    with pytest.raises(AudioError, match="sample rate"):
        load_audio(np.zeros(100, dtype=np.float32))
    with pytest.raises(AudioError, match="NaN"):
        load_audio((np.array([0.1, np.nan], dtype=np.float32), 16000))
    with pytest.raises(AudioError, match="dtype"):
        load_audio((np.array(["a"]), 16000))
    with pytest.raises(AudioError, match="unsupported audio input"):
        load_audio(12345)
    with pytest.raises(AudioError, match="1-D or 2-D"):
        load_audio((np.zeros((2, 2, 2), dtype=np.float32), 16000))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _empty_wav(path):
    sf.write(path, np.zeros((0,), dtype=np.float32), 16000)
    return path
