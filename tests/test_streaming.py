"""Streaming (issue #6): exact mode is the official streaming algorithm, the fixed text is never rewritten,
cached mode's parts equal the whole computation and its agreement with exact mode is reported, any
feed (odd sizes, other rates, int16) gives the same result, memory stays bounded, and the CLI works.

The reference below is the official ``streaming_transcribe`` / ``finish_streaming_transcribe``
(qwen-asr 0.0.6, spec §8.3) written against the offline pipeline: every chunk re-encodes all the audio
and decodes after ``prompt + prefix``, the prefix being the previous raw output minus its last tokens.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from functools import cache

import numpy as np
import pytest
from conftest import AUDIO, TINY

from mlx_asr.audio import load_audio, resample
from mlx_asr.config import num_audio_tokens
from mlx_asr.errors import AsrError
from mlx_asr.mel import num_frames
from mlx_asr.pipeline import AsrPipeline, Timings
from mlx_asr.prompt import STOP_IDS, fix_repetitions, parse_asr_output, prompt_text
from mlx_asr.streaming import StreamingSession, StreamResampler, _EncoderCache, repeat_safe_length

BACKENDS = [b for b in ("torch", "mlx") if __import__("importlib").util.find_spec(b) is not None]
MAX_NEW = 12  # tokens per update: the random tiny model never stops, so this bounds the test time


@cache
def _pipe(backend: str) -> AsrPipeline:
    return AsrPipeline.from_pretrained(TINY, backend=backend, device="cpu")


@cache
def _audio(name: str) -> np.ndarray:
    return load_audio(AUDIO / name)


@pytest.fixture(params=BACKENDS)
def pipe(request) -> AsrPipeline:
    return _pipe(request.param)


@pytest.fixture
def one_pipe() -> AsrPipeline:
    """For what streaming.py does the same on every backend (resampling, fixed text, memory policy)."""
    return _pipe(BACKENDS[0])


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model gains nothing from threads, and spinning OpenMP workers are slow on shared cores."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- reference
def official_stream(pipe, wav, language=None, context="", chunk_seconds=2.0, unfixed_chunks=2, rollback=5,
                    max_new_tokens=MAX_NEW) -> list[tuple[str, str]]:
    """(language, text) after every chunk and after the final flush, as the official algorithm gives them."""
    tok, pad = pipe.tokenizer, pipe.config.audio_token_id
    size = max(1, int(round(chunk_seconds * 16000)))
    base = prompt_text(context, language)
    accum, raw, out = np.zeros(0, np.float32), "", []

    def decode(prefix: str) -> str:
        ids = tok.encode(base + prefix)
        at = ids.index(pad)
        count = num_audio_tokens(num_frames(accum.shape[0]), pipe.config.audio.chunk_frames)
        ids = ids[:at] + [pad] * count + ids[at + 1 :]
        steps = pipe.backend.generate(ids, pipe.encode(accum, Timings()), max_new_tokens, STOP_IDS)
        return prefix + tok.decode([s.token for s in steps if s.token not in STOP_IDS])

    chunks = [wav[i : i + size] for i in range(0, wav.shape[0], size)]
    for n, chunk in enumerate(chunks):
        accum = np.concatenate([accum, chunk])
        prefix = ""
        if n >= unfixed_chunks:
            ids = tok.encode(raw)
            if chunk.shape[0] == size:  # streaming_transcribe: roll back more while the cut splits a character
                k = rollback
                while True:
                    end = max(0, len(ids) - k)
                    prefix = tok.decode(ids[:end], skip_special_tokens=False) if end > 0 else ""
                    if "\ufffd" not in prefix or end == 0:
                        prefix = "" if "\ufffd" in prefix else prefix
                        break
                    k += 1
            else:  # finish_streaming_transcribe
                prefix = tok.decode(ids[: max(1, len(ids) - rollback)], skip_special_tokens=False)
        raw = decode(prefix)
        out.append(parse_asr_output(raw, language))
    return out


def _pieces(n: int, sizes) -> list[tuple[int, int]]:
    bounds, i, k = [], 0, 0
    while i < n:
        step = sizes[k % len(sizes)]
        bounds.append((i, min(n, i + step)))
        i, k = i + step, k + 1
    return bounds


def _stream(pipe, samples, rate=16000, sizes=(None,), **options):
    """Feed ``samples`` in pieces of ``sizes`` (cycled; None = all at once); the decode updates and the final one."""
    session = pipe.stream(max_new_tokens=options.pop("max_new_tokens", MAX_NEW), **options)
    updates = []
    for a, b in _pieces(samples.shape[0], [s or samples.shape[0] for s in sizes]):
        updates.extend(session.iter_feed(samples[a:b], rate))
    *held, final = session.iter_finish()
    return session, updates + held, final


def _texts(updates, final) -> list[tuple[str, str]]:
    seen = [(u.language, u.text) for u in updates]
    if not updates or final.chunk != updates[-1].chunk:  # finish() decoded a tail
        seen.append((final.language, final.text))
    return seen


def _check_fixed(updates, final) -> None:
    """The fixed part only grows and every later text (the final one too) starts with it."""
    everything = [*updates, final]
    for i, u in enumerate(everything):
        assert u.text.startswith(u.fixed)
        for later in everything[i + 1 :]:
            assert later.fixed.startswith(u.fixed), (u.fixed, later.fixed)
            assert later.text.startswith(u.fixed), (u.fixed, later.text)
    assert final.final and final.fixed == final.text


# ---------------------------------------------------------------------------------------------- exact mode
EXACT_CASES = {
    "short-whole-auto": dict(clip="short_2s.wav"),
    "medium-odd-pieces-auto": dict(clip="medium_10s.flac", sizes=(1, 7919, 333, 16001, 2)),
    "medium-forced-context": dict(clip="medium_10s.flac", language="English", context="Qwen, MLX", sizes=(4097,)),
    "short-chunk0.7-unfixed1-rollback3": dict(
        clip="short_2s.wav", language="English", sizes=(1234,), chunk_seconds=0.7, unfixed_chunks=1, rollback=3
    ),
}


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_exact_mode_is_the_official_algorithm(pipe, name):
    case = dict(EXACT_CASES[name])
    wav = _audio(case.pop("clip"))
    sizes = case.pop("sizes", (None,))
    rollback = case.pop("rollback", 5)
    expected = official_stream(pipe, wav, **{**case, "rollback": rollback})
    session, updates, final = _stream(pipe, wav, sizes=sizes, mode="exact", rollback_tokens=rollback, **case)
    assert _texts(updates, final) == expected
    assert final.text == expected[-1][1] and final.language == expected[-1][0]
    assert session.stats.prefix_clamps == 0 and session.stats.rewrites_blocked == 0
    _check_fixed(updates, final)


def test_other_sample_rates_and_int16(one_pipe):
    """44.1 kHz stereo and 8 kHz int16 fed in odd pieces equal the official algorithm on the resampled whole."""
    stereo, rate = __import__("soundfile").read(AUDIO / "medium_10s_44k_stereo.flac", dtype="float32")
    expected = official_stream(one_pipe, load_audio(AUDIO / "medium_10s_44k_stereo.flac"), language="English")
    _, updates, final = _stream(one_pipe, stereo, rate, sizes=(4410, 1, 12345), mode="exact", language="English")
    assert _texts(updates, final) == expected

    low = resample(_audio("short_2s.wav"), 16000, 8000)
    pcm = np.round(low * 32767).astype(np.int16)
    expected = official_stream(one_pipe, load_audio((pcm, 8000)))
    _, updates, final = _stream(one_pipe, pcm, 8000, sizes=(999, 3), mode="exact")
    assert _texts(updates, final) == expected


def test_stream_resampler_total_and_values():
    x = np.random.default_rng(1).standard_normal(44100 * 3 + 17).astype(np.float32) * 0.1
    rs = StreamResampler(44100)
    out = [rs.process(x[a:b]) for a, b in _pieces(x.shape[0], [1, 4410, 999, 30000])]
    out = np.concatenate([*out, rs.flush()])
    assert out.shape[0] == math.ceil(x.shape[0] * 16000 / 44100)
    np.testing.assert_array_equal(out, resample(x, 44100))


# ---------------------------------------------------------------------------------------------- fixed text
def test_fixed_part_never_rewritten_under_churn(one_pipe):
    """Short chunks, one unfixed chunk and a short rollback rewrite the most; the fixed part still holds."""
    for mode in ("exact", "cached"):
        session, updates, final = _stream(one_pipe, _audio("medium_10s.flac")[: 6 * 16000], sizes=(3001,), mode=mode,
                                          chunk_seconds=0.5, unfixed_chunks=1, rollback_tokens=2, max_new_tokens=6)
        assert any(u.fixed for u in updates)
        _check_fixed(updates, final)


def test_guard_keeps_fixed_text(pipe):
    """A parsed text that contradicts the fixed part (the repetition filter can cause it) keeps the fixed part."""
    session = pipe.stream(language="English")
    session._raw, session._fixed_raw = "hello world again", "hello world"
    first = session._display(final=False)
    assert first[1:] == ("hello world again", "hello world")
    session._last = session._last.__class__(language="English", text=first[1], fixed=first[2])
    session._raw = "help"
    _, text, fixed = session._display(final=False)
    assert text.startswith("hello world") and fixed == "hello world"
    assert session.stats.rewrites_blocked == 1


@pytest.mark.parametrize("mode", ["exact", "cached"])
def test_decoding_prefix_never_shrinks_below_the_fixed_text(one_pipe, mode):
    """When the official rollback would cut into fixed text, the fixed text is kept as the decoding prefix."""
    session = one_pipe.stream(language="English", mode=mode, max_new_tokens=4)
    session.feed(_audio("short_2s.wav")[:32000])
    session.feed(np.zeros(32000, np.float32))  # past the unfixed chunks
    session._raw = session._fixed_raw = "hello there world"  # rolling back 5 tokens would remove it all
    update = session.feed(_audio("medium_10s.flac")[:32000])
    assert session.stats.prefix_clamps == 1
    assert session.prompt_text_in_view.startswith("hello there world") and update.text.startswith("hello there world")


@pytest.mark.parametrize("threshold", [2, 3, 20])
def test_repeat_safe_length_survives_any_continuation(threshold):
    rng = random.Random(threshold)
    for _ in range(1500):
        s = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 50)))
        cut = s[: repeat_safe_length(s, threshold)]
        x = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 50)))
        assert fix_repetitions(s + x, threshold).startswith(fix_repetitions(cut, threshold)), (s, x)


def test_finish_without_audio(pipe):
    assert pipe.stream().finish().text == ""
    empty = pipe.stream(language="en")
    assert empty.feed(np.zeros(0, np.float32)).text == ""
    final = empty.finish()
    assert (final.language, final.text, final.fixed, final.final) == ("English", "", "", True)
    with pytest.raises(AsrError):
        empty.feed(np.zeros(10, np.float32))


def test_bad_input_is_refused(pipe):
    session = pipe.stream()
    session.feed(np.zeros(100, np.float32), 16000)
    with pytest.raises(AsrError, match="sample rate changed"):
        session.feed(np.zeros(100, np.float32), 44100)
    with pytest.raises(AsrError, match="NaN"):
        pipe.stream().feed(np.array([0.0, np.nan], np.float32))
    with pytest.raises(AsrError, match="mode"):
        pipe.stream(mode="fast")


# ---------------------------------------------------------------------------------------------- cached mode
def test_cached_encoder_equals_whole_encoding(pipe):
    """Finished windows + the unfinished window from kept stem rows and new ones = the whole recording's audio
    embeddings, also when the last chunk is partial (convolved at full width inside a longer recording)."""
    backend = pipe.backend
    wav = _audio("long_60s.flac")
    for steps in [(8.3,), (3.0, 9.0, 12.0), (5.5, 17.05), (0.7, 1.2, 16.0025, 17.0)]:
        enc = _EncoderCache(backend)
        for seconds in steps:  # earlier updates leave finished chunks and windows behind
            audio = wav[: int(seconds * 16000)]
            tail, tail_tokens, _ = enc.update(audio)
        rows = [backend.to_numpy(w) for w, _ in enc.windows] + ([backend.to_numpy(tail)] if tail_tokens else [])
        whole = backend.to_numpy(backend.encode(backend.log_mel(audio)))
        got = np.concatenate(rows)
        assert got.shape == whole.shape
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_cached_encoder_floor_is_the_only_approximation(pipe):
    """The log-mel floor (max - 8) spans the whole recording: a window finished before louder audio arrived
    keeps its floor (cached mode's one approximation); the unfinished window is refloored and exact."""
    backend = pipe.backend
    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(9 * 16000) * 1e-4).astype(np.float32)
    audio = np.concatenate([quiet, _audio("medium_10s.flac")[: 5 * 16000]])
    enc = _EncoderCache(backend)
    enc.update(audio[: 9 * 16000])  # window 0 finished while everything was quiet
    tail, _, _ = enc.update(audio)
    whole = backend.to_numpy(backend.encode(backend.log_mel(audio)))
    scale = np.abs(whole).max()
    assert np.abs(backend.to_numpy(enc.windows[0][0]) - whole[:104]).max() > 1e-3 * scale
    np.testing.assert_allclose(backend.to_numpy(tail), whole[104:], rtol=0, atol=1e-5 * scale)


def test_prepared_decoder_cache_equals_a_rebuild(one_pipe, monkeypatch):
    """The decoder cache built ahead of a window drop gives the same updates as rebuilding it at the drop."""
    wav = _audio("long_60s.flac")[: 36 * 16000]
    options = dict(language="English", context_seconds=16, sizes=(32000,), max_new_tokens=4)
    session, prepared, _ = _stream(one_pipe, wav, **options)
    assert session.stats.dropped_seconds == 16
    monkeypatch.setattr(StreamingSession, "_prepare_next_prefix", lambda self: 0)
    _, rebuilt, _ = _stream(one_pipe, wav, **options)
    assert [u.text for u in prepared] == [u.text for u in rebuilt]
    assert max(u.prefill_tokens for u in prepared) < max(u.prefill_tokens for u in rebuilt)  # no spike at the drop


def test_prefix_cache_generates_like_the_whole_prompt(pipe):
    backend, pad = pipe.backend, pipe.config.audio_token_id
    wav = _audio("medium_10s.flac")
    embeds = pipe.encode(wav, Timings())
    ids = pipe._prompt(wav, "English", "")
    at = ids.index(pad)
    whole = [s.token for s in backend.generate(ids, embeds, 16, STOP_IDS)]
    prefix = backend.prefill_prefix(ids[:at], None)
    prefix = backend.prefill_prefix(ids[at : at + 104], embeds[:104], prefix)
    drafts = [(), whole[:5], whole[:3] + [7, 8], [9] * 6, whole[:20]]  # right, half right, wrong, too long
    for draft in drafts:  # the prefix is reusable, and a draft changes nothing but the work
        after = backend.generate_after(prefix, ids[at + 104 :], embeds[104:], 16, STOP_IDS, draft=draft)
        assert [s.token for s in after] == whole, draft


def test_cached_agreement_with_exact_is_reported(pipe, capsys):
    """How often cached mode's text differs from exact mode's, update by update (reported, not required)."""
    rows = []
    for clip in ("short_2s.wav", "medium_10s.flac", "medium_10s_44k_stereo.flac", "silence_1s.wav", "short_0p3s.wav"):
        wav = _audio(clip)
        runs = {}
        for mode in ("exact", "cached"):
            runs[mode] = _texts(*_stream(pipe, wav, sizes=(5000,), mode=mode, context_seconds=None)[1:])
        same = sum(a == b for a, b in zip(runs["exact"], runs["cached"], strict=True))
        rows.append((clip, same, len(runs["exact"]), runs["exact"][-1] == runs["cached"][-1]))
    report = ", ".join(f"{c} {s}/{n} updates, final {'=' if f else '!='}" for c, s, n, f in rows)
    with capsys.disabled():
        print(f"\ncached vs exact ({pipe.backend.name}): {report}")
    # Clips shorter than one 8-s window have nothing cached but the prompt head: they must agree.
    assert all(s == n for c, s, n, _ in rows if _audio(c).shape[0] < 8 * 16000)


# ---------------------------------------------------------------------------------------------- memory bound
@pytest.mark.parametrize("mode", ["cached", "exact"])
def test_memory_stays_bounded(one_pipe, mode):
    wav = _audio("long_60s.flac")[: 40 * 16000]
    session = one_pipe.stream(language="English", mode=mode, context_seconds=8, max_new_tokens=6)
    updates, views = [], []
    for a, b in _pieces(wav.shape[0], [24000]):
        for u in session.iter_feed(wav[a:b]):
            updates.append(u)
            views.append((session.audio_in_view, len(session.prompt_text_in_view)))
    final = session.finish()
    assert max(v for v, _ in views) <= 16.0 + 2.0  # one finished window + the unfinished one (+ a chunk)
    assert session.stats.dropped_seconds >= 16
    assert session.stats.committed_chars > 0
    late = [u.prompt_tokens for u in updates[-8:]]
    assert max(late) <= max(u.prompt_tokens for u in updates[:12]) + 30  # no growth with the session
    _check_fixed(updates, final)


# ---------------------------------------------------------------------------------------------- CLI
_THREADS = ["--threads", "1"] if BACKENDS[0] == "torch" else []


def _cli(*args: str):
    from typer.testing import CliRunner

    from mlx_asr.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_listen_from_file_and_transcribe_stream():
    clip = str(AUDIO / "medium_10s.flac")
    common = ["-m", str(TINY), "--backend", BACKENDS[0], "-l", "en", "--max-new-tokens", "8", *_THREADS]
    result = _cli("listen", *common, "--input", clip, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    _, updates, final = _stream(_pipe(BACKENDS[0]), _audio("medium_10s.flac"), language="en", max_new_tokens=8)
    assert len(rows) == 6 == len(_texts(updates, final))  # 5 whole chunks, then the 0.13-s tail
    assert rows[-1]["final"] and rows[-1]["text"] == final.text
    assert all(not r["final"] for r in rows[:-1]) and all(r["text"].startswith(r["fixed"]) for r in rows)

    lines = _cli("listen", *common, "--input", clip)  # not a terminal: fixed pieces as plain lines
    assert lines.exit_code == 0 and "".join(lines.stdout.split()) == "".join(final.text.split())

    streamed = _cli("transcribe", *common, "--stream", "--format", "json", clip)
    assert streamed.exit_code == 0, streamed.output
    rows = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert len(rows) == 6 and rows[-1]["final"] and rows[-1]["text"] == final.text and rows[0]["file"] == clip


def test_cli_printer_styles():
    """Not a terminal: whole words as they become fixed, one piece a line; a terminal: the tail rewritten."""
    import io

    from mlx_asr.cli import _StreamPrinter
    from mlx_asr.streaming import StreamUpdate

    updates = [StreamUpdate("English", "Hello wor", ""), StreamUpdate("English", "Hello world, how are", "Hello wor"),
               StreamUpdate("English", "Hello world, how are you?", "Hello world, how"),
               StreamUpdate("English", "Hello world, how are you?", "Hello world, how are you?", final=True)]
    out = io.StringIO()
    printer = _StreamPrinter(out, "lines")
    for u in updates[:-1]:
        printer.show(u)
    printer.close(updates[-1])
    assert out.getvalue() == "Hello\nworld, how\nare you?\n"

    out = io.StringIO()
    printer = _StreamPrinter(out, "live")
    for u in updates[:-1]:
        printer.show(u)
    printer.close(updates[-1])
    screen = out.getvalue()
    assert screen.endswith("\n") and "\x1b[2mHello wor\x1b[0m" in screen and screen.count("\x1b[J") == 4
    visible = screen.replace("\x1b[2m", "").replace("\x1b[0m", "")
    assert "Hello wor" in visible and "are you?" in visible


def test_cli_listen_without_microphone(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as when the extra is not installed
    result = _cli("listen", "-m", str(TINY))
    assert result.exit_code == 3
    assert "sounddevice" in result.output and "--input" in result.output


def test_cli_listen_realtime_ctrl_c_finishes_cleanly():
    """--realtime paces the file; Ctrl-C stops feeding, decodes what was heard and prints the final transcript."""
    cmd = [sys.executable, "-m", "mlx_asr.cli", "listen", "-m", str(TINY), "--backend", BACKENDS[0], "-l", "en",
           "--input", str(AUDIO / "medium_10s.flac"), "--realtime", "--format", "jsonl", "--max-new-tokens", "4",
           *_THREADS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the first update comes after 2 s of (real-time) audio
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in [first, *out.splitlines()]]
    assert rows[0]["audio_seconds"] == 2.0 and rows[-1]["final"]
    assert rows[-1]["audio_seconds"] < 9.0  # stopped before the end of the 10-s file
    assert time.monotonic() - started < 30


class _FakeSoundDevice:
    """Stands in for the ``sounddevice`` module: one 44.1 kHz microphone fed from a fixture by a thread.

    The stream calls back with ``[frames, 1]`` float32 blocks as PortAudio does, then presses Ctrl-C.
    """

    RATE = 44100

    def __init__(self, clip: np.ndarray) -> None:
        self.clip = clip
        self.opened: dict = {}

    def query_devices(self, device, kind):
        if device not in (None, 0, "Fake mic"):
            raise ValueError(f"No input device matching {device!r}")
        return {"name": "Fake mic", "default_samplerate": float(self.RATE)}

    def InputStream(self, **kwargs):  # noqa: N802 - sounddevice's name
        self.opened = kwargs
        fake = self

        class Stream:
            def __enter__(self):
                import threading

                self.thread = threading.Thread(target=self.run, daemon=True)
                self.thread.start()
                return self

            def run(self):
                size = kwargs["blocksize"]
                for i in range(0, fake.clip.shape[0], size):
                    kwargs["callback"](fake.clip[i : i + size, None], size, None, None)
                    time.sleep(0.002)
                time.sleep(1.0)  # let the listen loop take the blocks, then Ctrl-C
                import os

                os.kill(os.getpid(), signal.SIGINT)

            def __exit__(self, *exc):
                self.thread.join()

        return Stream()


def test_cli_listen_microphone_path(monkeypatch):
    """The sounddevice path end to end with a fake 44.1 kHz microphone: blocks in, Ctrl-C, final transcript.

    The final text must equal a session fed the same 44.1 kHz blocks (the number of blocks heard is read
    from the final update, so the check does not depend on timing).
    """
    clip = resample(_audio("medium_10s.flac"), 16000, _FakeSoundDevice.RATE).astype(np.float32)
    fake = _FakeSoundDevice(clip)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    result = _cli("listen", "-m", str(TINY), "--backend", BACKENDS[0], "-l", "en", "--max-new-tokens", "8",
                  "--format", "jsonl", *_THREADS)
    assert result.exit_code == 0, result.output
    assert fake.opened["samplerate"] == fake.RATE and fake.opened["channels"] == 1
    assert "listening on Fake mic at 44100 Hz" in result.stderr
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["final"] and final["audio_seconds"] > 2.0
    heard = round(final["audio_seconds"] * fake.RATE)
    session = _pipe(BACKENDS[0]).stream(language="en", max_new_tokens=8)
    size = fake.opened["blocksize"]
    for i in range(0, heard, size):
        session.feed(clip[i : min(i + size, heard), None], fake.RATE)
    assert session.finish().text == final["text"]


def test_cli_listen_unknown_microphone(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", _FakeSoundDevice(np.zeros(1, np.float32)))
    result = _cli("listen", "-m", str(TINY), "--mic", "USB headset")
    assert result.exit_code == 3
    assert "no microphone 'USB headset'" in result.output and "python -m sounddevice" in result.output


def test_catch_up_decodes_the_pending_chunks_of_a_feed_together(one_pipe):
    """catch_up: one update per feed however many chunks it completes; cached equals exact; the first
    merged update equals a 4-s-chunk stream's first update."""
    samples = _audio("long_60s.flac")[: 16000 * 25]
    seconds = [0.5, 5.0, 1.0, 4.0, 9.5, 5.0]  # completes 0, 2, 1, 2, 5, 2 chunks
    runs = {}
    for mode in ("cached", "exact"):
        session = one_pipe.stream(language="en", mode=mode, catch_up=True, max_new_tokens=MAX_NEW)
        per_feed, start = [], 0
        for s in seconds:
            end = start + int(s * 16000)
            per_feed.append(list(session.iter_feed(samples[start:end])))
            start = end
        runs[mode] = (per_feed, session.finish(), session.stats)
    per_feed, final, stats = runs["cached"]
    assert [len(u) for u in per_feed] == [0, 1, 1, 1, 1, 1]
    assert [u[0].audio_seconds for u in per_feed if u] == [4.0, 6.0, 10.0, 20.0, 24.0]
    assert stats.merged_chunks == 1 + 1 + 4 + 1 and stats.updates == 6  # 5 updates + the tail at finish
    exact_feed, exact_final, _ = runs["exact"]
    assert [[u.text for u in us] for us in per_feed] == [[u.text for u in us] for us in exact_feed]
    assert final.text == exact_final.text
    _check_fixed([u for us in per_feed for u in us], final)

    four = one_pipe.stream(language="en", mode="exact", chunk_seconds=4.0, max_new_tokens=MAX_NEW)
    assert four.feed(samples[: 4 * 16000]).text == exact_feed[1][0].text


def test_paced_file_reads_return_what_was_recorded_meanwhile():
    """--input --realtime/--speed behaves like a microphone: audio piles up while an update runs."""
    from mlx_asr.cli import _file_blocks, _Stop

    blocks = _file_blocks(AUDIO / "medium_10s.flac", 20.0, _Stop())  # 20x: 2 s of audio per 0.1 s
    first, rate = next(blocks)
    time.sleep(0.25)  # an update taking 0.25 s = 5 s of audio at 20x
    second, _ = next(blocks)
    assert first.shape[0] < rate and second.shape[0] >= 4 * rate and second.shape[0] % int(rate * 0.1) == 0
    rest = sum(b.shape[0] for b, _ in blocks)
    assert first.shape[0] + second.shape[0] + rest == load_audio(AUDIO / "medium_10s.flac").shape[0]
