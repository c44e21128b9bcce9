"""Streaming transcription: feed audio as it arrives, read ``(language, text)`` and which part of it is final.

    session = pipe.stream(language="en")          # or AsrPipeline.stream(..., mode="exact")
    for block in microphone_blocks():             # any length, any sample rate, int16 or float
        update = session.feed(block, sample_rate=48000)
        print(update.fixed, "|", update.unfixed)
    final = session.finish()                      # flushes the tail; final.text is the transcript

Algorithm (the official one, spec §8.3, ``qwen_asr/inference/qwen3_asr.py`` ``streaming_transcribe``).
Audio is cut into chunks of ``chunk_seconds`` (2 s) of 16 kHz samples. After each chunk the model
transcribes all the audio it sees with a *decoding prefix*: nothing for the first ``unfixed_chunks`` (2)
chunks, afterwards the previous raw output minus its last ``rollback_tokens`` (5) tokens (more while the
cut leaves a U+FFFD, i.e. splits a character). The model continues that prefix greedily; prefix +
continuation is the new raw output, parsed into ``(language, text)``. :meth:`StreamingSession.finish`
decodes the remaining (< chunk) tail once more, with the official rollback of the last update
(``max(1, n - k)`` tokens kept, no U+FFFD loop). ``finish()`` with no buffered audio decodes nothing.

Fixed text. The text of the last ``unfixed_chunks`` chunks is unfixed; everything before it is final.
Concretely the raw output that the decoding prefixes of the last ``unfixed_chunks`` updates agree on is
fixed, and the fixed part only grows: :attr:`StreamUpdate.fixed` is a prefix of every later ``text``,
``finish()`` included. Two guards keep that promise where the official algorithm alone would not: the
decoding prefix is never allowed to shrink below the fixed raw text (counted in
``stats.prefix_clamps``), and a parsed text that would contradict the fixed part keeps the fixed part
(``stats.rewrites_blocked``; only the official repetition filter could cause it). With both counters at
0 -- the normal case, always so on the test fixtures -- the texts are exactly the official algorithm's.
A trailing stretch that the official repetition filter (``fix_repetitions``) could still collapse is
held back from the fixed part. In auto-language mode nothing is fixed before ``language X<asr_text>`` is.

Modes. ``mode="exact"`` re-encodes all the audio in view and prefills the whole prompt on every chunk,
which is the official algorithm (cost grows with the session). ``mode="cached"`` (default) keeps what
cannot change. The encoder convolves 100-frame chunks independently (sinusoid positions restart in each)
and attends within 8-s windows (800 frames, 104 tokens); a chunk or window is *finished* once its last
mel frame no longer reaches past the samples (no reflect padding). The conv-stem rows of finished chunks
and the audio embeddings of finished windows are kept, so an update convolves only the last ~3 chunks
and runs the transformer over the unfinished window only. New mel frames are computed from the audio
with 2 frames of real left context and floored at ``max - 8`` over every frame in view, as the
whole-utterance log-mel is; a kept chunk of the unfinished window that a louder frame would re-floor is
redone. The decoder's KV cache of the prompt up to the end of the finished windows is kept as well:
each update prefills only the unfinished window's tokens, the end of the prompt and the text prefix,
then decodes. The previous output's rolled-back tokens go through that prefill as a draft: each one the
model confirms (all of them on the benchmark) costs no decoding step of its own.

The one systematic difference from exact mode: a finished window keeps the log-mel floor of its time
when louder audio arrives later (only values 80 dB below the loudest frame are affected;
``tests/test_streaming.py`` shows it with 9 s of near-silence before speech). Rounding differs slightly
too (other matrix shapes, draft tokens checked in the prefill), which can flip a greedy choice where two
tokens are nearly tied. Measured on the fixture clips (``benchmarks/bench_stream.py --agreement``): in
float32 (the tiny checkpoint on both backends; the 0.6B-shaped random checkpoint on torch) cached and
exact give the same text at every update; in bfloat16 (0.6B-shaped, torch) rounding flips near-ties, e.g.
medium_10s agrees on 2 of 6 updates and long_60s on 27 of 30.

Memory policy (``context_seconds``, ``max_prefix_tokens``). Unbounded in exact mode by default (the
official code keeps everything); 16 s in cached mode. The model sees ``ceil(context_seconds / 8)``
finished encoder windows plus the unfinished one (16-24 s by default); when one more window completes,
the oldest is dropped whole, so what is cached stays valid, and the decoder cache without it has been
built ahead, 64 tokens per update (no long prefill at the drop). The text leaves the decoding prefix
with its audio: the fixed text as it stood when the dropped audio had just been fed (it transcribes
audio that is gone by then) is *committed* -- it stays at the start of ``text`` and ``fixed`` but is no
longer sent to the model -- cut at a space where there is one within 32 characters. In auto-language
mode the ``language X<asr_text>`` header stays in the prefix. As a backstop for a model that runs away
or repeats without end (its text then never becomes fixed), text beyond ``max_prefix_tokens`` (6 per
second in view) is committed even if unfixed. Audio, text prefix, encoder and decoder caches are thus
bounded, so an update costs the same after an hour as after a minute; only the committed transcript
string grows. With a window, exact mode re-encodes just the audio in view, and neither mode equals the
official algorithm once audio has been dropped.

Input. ``feed(samples, sample_rate)``: 1-D mono or 2-D ``[frames, channels]`` (as sounddevice and
soundfile give), float or int16/int32, any length (even 0) and any sample rate: other rates go through
an incremental soxr resampler (the same soxr HQ filter as :func:`mlx_asr.audio.load_audio`, bit-exact
with resampling the whole recording at once; ``finish()`` pads the total to ``ceil(n * 16000 / rate)``
as the offline path does). Samples are clipped to [-1, 1]; unlike ``load_audio`` a stream cannot be
divided by its peak, which is unknown until the end.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .audio import to_float32
from .backends import Step
from .config import HOP_LENGTH, N_FFT, SAMPLE_RATE, num_audio_tokens
from .errors import AsrError, AudioError
from .languages import resolve_language
from .mel import num_frames
from .prompt import (
    ASR_TEXT_TAG,
    REPETITION_THRESHOLD,
    STOP_IDS,
    parse_asr_output,
    prompt_text,
)

MODES = ("cached", "exact")
DEFAULT_CHUNK_SECONDS = 2.0
DEFAULT_UNFIXED_CHUNKS = 2
DEFAULT_ROLLBACK_TOKENS = 5
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_CACHED_CONTEXT_SECONDS = 16.0
SPACE_SEARCH = 32  # characters searched back for a space when text leaves the prompt
PREPARE_TOKENS = 64  # decoder-cache tokens prepared per update ahead of a window drop
PREFIX_TOKENS_PER_SECOND = 6  # default bound of the text in view per second of audio in view (speech: 3-5)
_REPEAT_MAX_PERIOD = 20  # longest pattern the official repetition filter looks for
_META_HEAD = "language"


@dataclass(frozen=True)
class StreamTimings:
    """Seconds one update spent in each stage (``encoder`` includes the log-mel)."""

    encoder: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encoder + self.prefill + self.decode


@dataclass(frozen=True)
class StreamUpdate:
    """The state of a stream after an update.

    ``text`` is the current transcript, ``fixed`` its final part (a prefix of ``text`` and of every later
    ``text``), ``unfixed`` the rest. ``final`` is True for the result of :meth:`StreamingSession.finish`
    (then ``fixed == text``). ``chunk`` counts the decodes so far (0 before the first), ``audio_seconds``
    is the audio they covered, ``seconds`` the processing time of this update (0 when nothing was decoded).
    """

    language: str
    text: str
    fixed: str
    final: bool = False
    chunk: int = 0
    audio_seconds: float = 0.0
    seconds: float = 0.0
    timings: StreamTimings = field(default_factory=StreamTimings)
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    new_tokens: int = 0

    @property
    def unfixed(self) -> str:
        return self.text[len(self.fixed) :]


@dataclass
class StreamStats:
    """Counters over a session (see the module docstring for what the guards mean)."""

    updates: int = 0
    prefix_clamps: int = 0
    rewrites_blocked: int = 0
    dropped_seconds: float = 0.0
    committed_chars: int = 0
    forced_commits: int = 0
    draft_tokens: int = 0
    draft_confirmed: int = 0
    encoded_frames: int = 0
    prefill_tokens: int = 0
    new_tokens: int = 0
    merged_chunks: int = 0  # with catch_up: chunks decoded together with a later one (updates saved)


# ---------------------------------------------------------------------------------------------- helpers
def rollback_prefix(tokenizer, raw: str, rollback: int, guard: bool = True) -> tuple[str, list[int]]:
    """The official decoding prefix: ``raw`` minus its last ``rollback`` tokens; and the tokens cut off.

    With ``guard`` (every chunk) more tokens go while the cut leaves a U+FFFD; without (``finish``) at
    least one token is kept, as ``finish_streaming_transcribe`` does.
    """
    ids = tokenizer.encode(raw)
    if not guard:
        end = max(1, len(ids) - rollback)
        return tokenizer.decode(ids[:end], skip_special_tokens=False), ids[end:]
    k = rollback
    while True:
        end = max(0, len(ids) - k)
        if end == 0:
            return "", ids
        prefix = tokenizer.decode(ids[:end], skip_special_tokens=False)
        if "\ufffd" not in prefix:
            return prefix, ids[end:]
        k += 1


def repeat_safe_length(s: str, threshold: int = REPETITION_THRESHOLD, max_period: int = _REPEAT_MAX_PERIOD) -> int:
    """Length of the start of ``s`` that the official repetition filter keeps as it is whatever text follows.

    The filter (``fix_repetitions``) keeps one copy of any pattern of up to ``max_period`` characters
    repeated ``threshold`` times, but only looks for one once the text is long enough. So the start is cut
    after the first copy of every such run already present, and then after the first period of any
    periodic tail longer than one period (more text could make it a run); what is left has no run and no
    growing tail, so the filter leaves it alone in ``s`` and in any longer text.
    """
    n = len(s)
    cut = n
    i = 0
    while i < cut:  # runs already complete: the leftmost one decides
        for k in range(1, max_period + 1):
            if i + k * threshold > n:
                break
            if s[i : i + k] == s[i + k : i + 2 * k] and s[i : i + k] * threshold == s[i : i + k * threshold]:
                cut = min(cut, i + k)
                break
        i += 1
    while True:  # periodic tails, until the cut leaves none
        best = cut
        for k in range(1, max_period + 1):
            if cut <= k:
                break
            j = cut - k
            while j > 0 and s[j - 1] == s[j - 1 + k]:
                j -= 1
            if cut - j > k:
                best = min(best, j + k)
        if best == cut:
            return cut
        cut = best


def _common_prefix(strings: list[str]) -> str:
    if not strings:
        return ""
    first, last = min(strings), max(strings)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _to_mono(samples: Any) -> np.ndarray:
    """Float32 mono of a 1-D array or a 2-D ``[frames, channels]`` array (int16/int32 scaled)."""
    x = to_float32(samples)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    elif x.ndim != 1:
        raise AudioError(f"stream audio must be 1-D or [frames, channels], got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise AudioError("stream audio contains NaN or infinite samples")
    return x


class StreamResampler:
    """Incremental soxr HQ resampling to 16 kHz; the total after :meth:`flush` is ``ceil(n * 16000 / rate)``."""

    def __init__(self, rate: int) -> None:
        import soxr

        if rate <= 0:
            raise AudioError(f"invalid sample rate {rate}")
        self.rate = rate
        self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="soxr_hq")
        self.consumed = 0
        self.produced = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        self.consumed += x.shape[0]
        out = self._stream.resample_chunk(x, last=False)
        self.produced += out.shape[0]
        return out

    def flush(self) -> np.ndarray:
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        want = math.ceil(self.consumed * SAMPLE_RATE / self.rate) - self.produced
        out = out[: max(want, 0)] if out.shape[0] >= want else np.pad(out, (0, want - out.shape[0]))
        self.produced += out.shape[0]
        return out.astype(np.float32, copy=False)


class _EncoderCache:
    """Audio embeddings of the audio in view: finished 8-s attention windows and the conv-stem rows of
    finished 1-s chunks are kept; only the last chunks' stem and the unfinished window's layers are redone.

    A chunk (window) is finished when its last mel frame no longer reaches past the samples, i.e. needs
    no reflect padding. New mel frames are cut from the audio with 2 frames of real left context (dropped
    again) and floored at ``max - 8`` over all frames in view, as the whole-utterance log-mel would be.
    """

    CONTEXT_FRAMES = 2

    def __init__(self, backend) -> None:
        audio = backend.config.audio
        self.backend = backend
        self.chunk_frames = audio.chunk_frames
        self.chunk_tokens = num_audio_tokens(audio.chunk_frames, audio.chunk_frames)
        self.window_chunks = audio.window_chunks
        self.window_tokens = self.chunk_tokens * self.window_chunks
        self.windows: list[tuple[Any, float]] = []  # (embeddings [tokens, hidden], largest mel value)
        self.stems: list[tuple[Any, float, float]] = []  # finished chunks of the unfinished window:
        # (stem rows, largest and smallest mel value)

    def finished_chunks(self, n_samples: int) -> int:
        """Chunks whose every mel frame is final with ``n_samples`` samples in view."""
        last_frame_end = (self.chunk_frames - 1) * HOP_LENGTH + N_FFT // 2  # samples chunk 0's last frame reads
        if n_samples < last_frame_end:
            return 0
        return (n_samples - last_frame_end) // (self.chunk_frames * HOP_LENGTH) + 1

    def drop(self, count: int) -> None:
        """Forget the oldest ``count`` windows (with their audio)."""
        if count > len(self.windows):  # the unfinished window went too
            self.stems.clear()
        del self.windows[:count]

    def _kept_max(self) -> float:
        return max([m for _, m in self.windows] + [m for _, m, _ in self.stems], default=-math.inf)

    def _floored(self, audio: np.ndarray, total: int) -> np.ndarray | None:
        """Log-mel of the frames after the kept stems, floored at ``max - 8`` over every frame in view.

        A louder new frame raises the floor: kept stems of the unfinished window that had values below the
        new floor are redone too (finished windows keep theirs: the one approximation of the cached mode).
        """
        while True:
            first = (len(self.windows) * self.window_chunks + len(self.stems)) * self.chunk_frames
            if total <= first:
                return None
            mel, real = self._mel(audio, first)
            top = max(real, self._kept_max())
            floor = np.float32(top) - np.float32(2.0)  # the floor max-8 in (x+4)/4 units
            stale = next((i for i, (_, _, low) in enumerate(self.stems) if low < floor - 1e-5), None)
            if stale is None:
                return np.maximum(mel, floor) if top > float(mel.max()) else mel
            del self.stems[stale:]

    def _mel(self, audio: np.ndarray, first: int) -> tuple[np.ndarray, float]:
        """Log-mel frames ``first..T`` of ``audio`` (floored over the slice), and the largest value among them."""
        if first == 0:
            mel = self.backend.to_numpy(self.backend.log_mel(audio))
            return mel, float(mel.max())
        for context in range(self.CONTEXT_FRAMES, self.CONTEXT_FRAMES + 4):
            mel = self.backend.to_numpy(self.backend.log_mel(audio[(first - context) * HOP_LENGTH :]))
            own, part = float(mel.max()), mel[:, context:]
            real = float(part.max()) if part.size else -math.inf
            # The slice's first frames are reflect-padded: when one of them is its loudest, the slice's own
            # floor is wrong for quiet frames unless a louder real frame exists (then re-flooring fixes it).
            if own <= max(real, self._kept_max()):
                break
        return part, real

    def update(self, audio: np.ndarray) -> tuple[Any | None, int, int]:
        """Encode what changed; returns (embeddings of the unfinished window or None, their tokens, frames)."""
        total = num_frames(audio.shape[0])
        if total <= self.chunk_frames:  # up to one chunk: the official encoder does not pad it
            mel = self.backend.to_numpy(self.backend.log_mel(audio))
            return self.backend.encode(mel), num_audio_tokens(total, self.chunk_frames), total
        pieces, frames = [], 0
        mel = self._floored(audio, total)
        if mel is not None:
            done = len(self.windows) * self.window_chunks + len(self.stems)
            frames = mel.shape[1]
            rows = self.backend.encode_stem(mel)
            new = max(0, min(self.finished_chunks(audio.shape[0]), -(-total // self.chunk_frames)) - done)
            for j in range(new):
                part = mel[:, j * self.chunk_frames : (j + 1) * self.chunk_frames]
                self.stems.append((rows[j * self.chunk_tokens : (j + 1) * self.chunk_tokens], float(part.max()),
                                   float(part.min())))
                if len(self.stems) == self.window_chunks:  # a whole window is finished
                    stems, self.stems = self.stems, []
                    embeds = self.backend.encode_window([r for r, _, _ in stems])
                    self.windows.append((embeds, max(m for _, m, _ in stems)))
            if new * self.chunk_tokens < rows.shape[0]:
                pieces = [rows[new * self.chunk_tokens :]]
        pieces = [r for r, _, _ in self.stems] + pieces
        if not pieces:
            return None, 0, frames
        tail = self.backend.encode_window(pieces)
        return tail, sum(p.shape[0] for p in pieces), frames


def _at_space(text: str, cut: int) -> int:
    """``cut`` moved back to just before a space when one is within ``SPACE_SEARCH`` characters."""
    if 0 < cut < len(text) and not text[cut].isspace():
        space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
        if space > 0 and cut - space <= SPACE_SEARCH:
            return space
    return cut


# ---------------------------------------------------------------------------------------------- session
class StreamingSession:
    """One live transcription stream over an :class:`~mlx_asr.pipeline.AsrPipeline` (see the module docs).

    Args:
        pipeline: a loaded pipeline (either backend).
        language: ``None``/``"auto"`` to detect, else a name or code (forced output language).
        context: background text placed in the system turn.
        mode: ``"cached"`` (default) or ``"exact"`` (the official algorithm: re-encode everything).
        chunk_seconds: audio per update (official default 2 s).
        unfixed_chunks: updates without a decoding prefix at the start, and how many chunks' worth of
            text stays unfixed (official ``unfixed_chunk_num``, 2).
        rollback_tokens: tokens of the previous output re-decoded each update (``unfixed_token_num``, 5).
        max_new_tokens: most tokens decoded per update (the official wrapper allows 4096; a bounded
            number bounds the cost of an update when the model runs away).
        context_seconds: audio the model sees, in whole 8-s encoder windows plus the unfinished one;
            ``None`` keeps everything. Default: unbounded in exact mode, 16 s in cached mode.
        max_prefix_tokens: most tokens of text in the decoding prefix; beyond, the oldest text is committed
            even if unfixed. Default: 6 per second of audio in view (144 for 16 s: two windows plus the
            unfinished one); ``None`` when ``context_seconds`` is ``None``.
        catch_up: when one feed completes several chunks, decode them together in a single update
            instead of one update per chunk. A live source whose updates take longer than a chunk then
            keeps up with real time (fewer, longer updates) instead of falling further behind; the
            fixed text is then the text of the last ``unfixed_chunks`` *updates*. Off by default (the
            official algorithm); ``mlx-asr listen`` turns it on.
    """

    def __init__(
        self,
        pipeline,
        language: str | None = None,
        context: str = "",
        *,
        mode: str = "cached",
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        unfixed_chunks: int = DEFAULT_UNFIXED_CHUNKS,
        rollback_tokens: int = DEFAULT_ROLLBACK_TOKENS,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        context_seconds: float | None | str = "default",
        max_prefix_tokens: int | None | str = "default",
        catch_up: bool = False,
    ) -> None:
        if mode not in MODES:
            raise AsrError(f"unknown streaming mode {mode!r}; choose cached or exact")
        if not chunk_seconds or chunk_seconds <= 0:
            raise AsrError(f"chunk_seconds must be > 0, got {chunk_seconds}")
        if unfixed_chunks < 0 or rollback_tokens < 0 or max_new_tokens < 1:
            raise AsrError("unfixed_chunks and rollback_tokens must be >= 0 and max_new_tokens >= 1")
        if context_seconds == "default":
            context_seconds = DEFAULT_CACHED_CONTEXT_SECONDS if mode == "cached" else None
        if context_seconds is not None and context_seconds <= 0:
            raise AsrError(f"context_seconds must be > 0 or None, got {context_seconds}")
        self.pipeline = pipeline
        self.backend = pipeline.backend
        self.tokenizer = pipeline.tokenizer
        self.config = pipeline.config
        self.forced = resolve_language(language)
        self.context = context or ""
        self.mode = mode
        self.chunk_seconds = float(chunk_seconds)
        self.chunk_samples = max(1, int(round(chunk_seconds * SAMPLE_RATE)))
        self.unfixed_chunks = int(unfixed_chunks)
        self.rollback_tokens = int(rollback_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.context_seconds = context_seconds
        self.catch_up = bool(catch_up)
        self.stats = StreamStats()
        self._prompt_text = prompt_text(self.context, self.forced)
        self._pad = self.config.audio_token_id
        self._resampler: StreamResampler | None = None
        self._rate: int | None = None
        self._buffer = np.zeros(0, dtype=np.float32)
        self._audio = np.zeros(0, dtype=np.float32)  # the audio in view
        self._audio_start = 0  # absolute sample index of _audio[0]
        self._chunk_id = 0
        self._raw = ""  # raw output in view: meta + text not yet committed
        self._prefixes: deque[str] = deque(maxlen=max(1, self.unfixed_chunks))
        self._fixed_raw = ""  # start of _raw that is final
        self._committed = ""  # display text that left the prompt
        self._committed_space = False  # whether the committed raw text ended with a space
        self._text_base = 0  # raw text characters committed so far
        self._snapshots: deque[tuple[int, int]] = deque()  # (samples fed, absolute end of fixed raw text)
        self._finished = False
        self._encoder: _EncoderCache | None = None
        self._kv: Any = None  # decoder KV cache of the prompt head + finished windows (cached mode)
        self._kv_tokens = 0  # audio tokens in it
        self._kv_next: Any = None  # the same without the oldest window, built ahead of its drop
        self._kv_next_tokens = 0
        self._head_ids: list[int] | None = None
        audio = self.config.audio
        self._window_samples = audio.window_chunks * audio.chunk_frames * HOP_LENGTH  # one encoder window
        self._keep_windows = None
        if context_seconds is not None:
            self._keep_windows = max(1, math.ceil(context_seconds * SAMPLE_RATE / self._window_samples - 1e-9))
        if max_prefix_tokens == "default":
            seconds_in_view = (self._keep_windows + 1) * self._window_samples / SAMPLE_RATE if self._keep_windows else 0
            max_prefix_tokens = int(PREFIX_TOKENS_PER_SECOND * seconds_in_view) or None
        self.max_prefix_tokens = max_prefix_tokens
        if mode == "cached":
            self._encoder = _EncoderCache(self.backend)
        self._last = StreamUpdate(language=self.forced or "", text="", fixed="")

    # ------------------------------------------------------------------ public API
    @property
    def update(self) -> StreamUpdate:
        """The latest update (the initial empty one before the first chunk)."""
        return self._last

    def feed(self, samples: Any, sample_rate: int = SAMPLE_RATE) -> StreamUpdate:
        """Add audio; decode every chunk it completes; return the latest update."""
        for _ in self.iter_feed(samples, sample_rate):
            pass
        return self._last

    def iter_feed(self, samples: Any, sample_rate: int = SAMPLE_RATE) -> Iterator[StreamUpdate]:
        """Add audio and yield the update of each chunk it completes (none if it completes none; with
        ``catch_up``, one update for all the chunks it completes)."""
        if self._finished:
            raise AsrError("this stream is finished; start a new one with pipeline.stream()")
        x = _to_mono(samples)
        self._buffer = np.concatenate([self._buffer, self._resample(x, int(sample_rate))])
        while self._buffer.shape[0] >= self.chunk_samples:
            take = self.chunk_samples
            if self.catch_up:
                take *= self._buffer.shape[0] // self.chunk_samples
                self.stats.merged_chunks += take // self.chunk_samples - 1
            chunk, self._buffer = self._buffer[:take], self._buffer[take:]
            yield self._decode(chunk, final=False)

    def finish(self) -> StreamUpdate:
        """Decode what is buffered and return the final update; the stream cannot be fed after."""
        for _ in self.iter_finish():
            pass
        return self._last

    def iter_finish(self) -> Iterator[StreamUpdate]:
        """:meth:`finish`, yielding every update it makes: whole chunks the resampler still held, then the
        final one (``final=True``; also when nothing was left to decode)."""
        if self._finished:
            return
        if self._resampler is not None:
            self._buffer = np.concatenate([self._buffer, np.clip(self._resampler.flush(), -1.0, 1.0)])
        while self._buffer.shape[0] >= self.chunk_samples:  # whole chunks the resampler held back
            chunk, self._buffer = self._buffer[: self.chunk_samples], self._buffer[self.chunk_samples :]
            yield self._decode(chunk, final=False)
        tail, self._buffer = self._buffer, np.zeros(0, dtype=np.float32)
        self._finished = True
        if tail.shape[0]:
            yield self._decode(tail, final=True)
            return
        last = self._last  # nothing left to decode: the last text becomes final as it is
        self._last = StreamUpdate(
            language=last.language, text=last.text, fixed=last.text, final=True, chunk=last.chunk,
            audio_seconds=last.audio_seconds,
        )
        yield self._last

    @property
    def audio_in_view(self) -> float:
        """Seconds of audio the model currently sees."""
        return self._audio.shape[0] / SAMPLE_RATE

    @property
    def prompt_text_in_view(self) -> str:
        """The raw output the next decoding prefix is cut from (header + text not yet committed)."""
        return self._raw

    # ------------------------------------------------------------------ input
    def _resample(self, x: np.ndarray, rate: int) -> np.ndarray:
        if self._rate is None:
            self._rate = rate
            if rate != SAMPLE_RATE:
                self._resampler = StreamResampler(rate)
        elif rate != self._rate:
            raise AudioError(f"the sample rate changed from {self._rate} to {rate} Hz within one stream")
        if self._resampler is not None:
            x = self._resampler.process(x)
        return np.clip(x, -1.0, 1.0)

    # ------------------------------------------------------------------ one update
    def _decode(self, chunk: np.ndarray, final: bool) -> StreamUpdate:
        start = time.perf_counter()
        self._audio = np.concatenate([self._audio, chunk])
        self._drop_old_audio()
        self._cap_text()
        if self._chunk_id < self.unfixed_chunks:
            prefix, draft = "", self.tokenizer.encode(self._raw)
        else:
            prefix, draft = rollback_prefix(self.tokenizer, self._raw, self.rollback_tokens, guard=not final)
        if not prefix.startswith(self._fixed_raw):
            prefix, draft = self._fixed_raw, []
            self.stats.prefix_clamps += 1
        ids = self.tokenizer.encode(self._prompt_text + prefix)
        at = ids.index(self._pad)
        head, rest = ids[:at], ids[at + 1 :]
        if self.mode == "exact":
            steps, timings, prompt_len, prefilled = self._run_exact(head, rest)
        else:
            steps, timings, prompt_len, prefilled = self._run_cached(head, rest, draft)
        generated = [s.token for s in steps if s.token not in STOP_IDS]
        self._raw = prefix + self.tokenizer.decode(generated)
        self._chunk_id += 1
        self._prefixes.append(prefix)
        if final:
            self._fixed_raw = self._raw
        elif len(self._prefixes) == self._prefixes.maxlen and self._chunk_id > self.unfixed_chunks:
            self._fixed_raw = max(self._fixed_raw, _common_prefix(list(self._prefixes)), key=len)
        fed = self._audio_start + self._audio.shape[0]
        self._snapshots.append((fed, self._text_base + max(0, len(self._fixed_raw) - len(self._meta() or ""))))
        language, text, fixed = self._display(final)
        self.stats.updates += 1
        self.stats.prefill_tokens += prefilled
        self.stats.new_tokens += len(steps)
        self._last = StreamUpdate(
            language=language, text=text, fixed=fixed, final=final, chunk=self._chunk_id,
            audio_seconds=fed / SAMPLE_RATE, seconds=time.perf_counter() - start, timings=timings,
            prompt_tokens=prompt_len, prefill_tokens=prefilled, new_tokens=len(steps),
        )
        return self._last

    def _run_exact(self, head: list[int], rest: list[int]) -> tuple[list[Step], StreamTimings, int, int]:
        t0 = time.perf_counter()
        mel = self.backend.log_mel(self._audio)
        embeds = self.backend.encode(mel)
        self.backend.synchronize()
        t1 = time.perf_counter()
        count = num_audio_tokens(num_frames(self._audio.shape[0]), self.config.audio.chunk_frames)
        ids = head + [self._pad] * count + rest
        self.stats.encoded_frames += num_frames(self._audio.shape[0])
        steps, prefill, decode = self._timed(self.backend.generate(ids, embeds, self.max_new_tokens, STOP_IDS))
        return steps, StreamTimings(t1 - t0, prefill, decode), len(ids), len(ids)

    def _run_cached(
        self, head: list[int], rest: list[int], draft: list[int]
    ) -> tuple[list[Step], StreamTimings, int, int]:
        enc = self._encoder
        t0 = time.perf_counter()
        tail, tail_tokens, frames = enc.update(self._audio)
        self.backend.synchronize()
        t1 = time.perf_counter()
        self.stats.encoded_frames += frames
        if head != self._head_ids:
            self._kv = self._kv_next = None
            self._head_ids = head
        prefilled = 0
        if self._kv is None:
            self._kv, self._kv_tokens = self.backend.prefill_prefix(head, None), 0
            prefilled += len(head)
        extended = self._kv_tokens < len(enc.windows) * enc.window_tokens
        while self._kv_tokens < len(enc.windows) * enc.window_tokens:
            self._kv, added = self._extend(self._kv, enc.windows, self._kv_tokens, enc.window_tokens)
            self._kv_tokens += added
            prefilled += added
        self.backend.synchronize()
        t2 = time.perf_counter()
        ids = [self._pad] * tail_tokens + rest
        prompt_len = len(head) + self._kv_tokens + len(ids)
        draft = draft[: self.max_new_tokens - 1]  # the previous output's tokens: confirmed ones cost no step
        prefilled += len(draft)
        steps, prefill, decode = self._timed(
            self.backend.generate_after(self._kv, ids, tail, self.max_new_tokens, STOP_IDS, draft=draft)
        )
        self.stats.draft_tokens += len(draft)
        confirmed = 0
        while confirmed < min(len(steps), len(draft)) and steps[confirmed].token == draft[confirmed]:
            confirmed += 1
        self.stats.draft_confirmed += confirmed
        t3 = time.perf_counter()
        if not extended:
            prefilled += self._prepare_next_prefix()
        self.backend.synchronize()
        prepared = time.perf_counter() - t3
        return steps, StreamTimings(t1 - t0, t2 - t1 + prefill + prepared, decode), prompt_len, prefilled + len(ids)

    def _extend(self, kv: Any, windows: list, done: int, budget: int) -> tuple[Any, int]:
        """Prefill up to ``budget`` more audio tokens of ``windows`` (``done`` already in ``kv``) into ``kv``."""
        size = self._encoder.window_tokens
        index, offset = divmod(done, size)
        count = min(budget, size - offset, len(windows) * size - done)
        rows = windows[index][0][offset : offset + count]
        return self.backend.prefill_prefix([self._pad] * count, rows, kv), count

    def _prepare_next_prefix(self) -> int:
        """Build, ``PREPARE_TOKENS`` at a time, the decoder cache needed once the oldest window is dropped
        (prompt head + the other finished windows), so that the drop costs no long prefill at once."""
        windows = self._encoder.windows[1:]
        if self._keep_windows is None or self._keep_windows < 2 or not windows:
            return 0
        budget, added = PREPARE_TOKENS, 0
        if self._kv_next is None:
            self._kv_next, self._kv_next_tokens = self.backend.prefill_prefix(self._head_ids, None), 0
            budget -= len(self._head_ids)
            added += len(self._head_ids)
        while budget > 0 and self._kv_next_tokens < len(windows) * self._encoder.window_tokens:
            self._kv_next, count = self._extend(self._kv_next, windows, self._kv_next_tokens, budget)
            self._kv_next_tokens += count
            budget -= count
            added += count
        return added

    def _timed(self, generator: Iterator[Step]) -> tuple[list[Step], float, float]:
        steps: list[Step] = []
        t0 = time.perf_counter()
        prefill = 0.0
        for step in generator:
            if not steps:
                prefill = time.perf_counter() - t0
            steps.append(step)
        return steps, prefill, time.perf_counter() - t0 - prefill

    # ------------------------------------------------------------------ memory bound
    def _drop_old_audio(self) -> None:
        """Keep ``_keep_windows`` whole encoder windows plus the unfinished one in view (module docs)."""
        if self._keep_windows is None:
            return
        window = self._window_samples
        drop = self._audio.shape[0] // window - self._keep_windows
        if drop <= 0:
            return
        self._audio = self._audio[drop * window :]
        self._audio_start += drop * window
        self.stats.dropped_seconds += drop * window / SAMPLE_RATE
        if self._encoder is not None:
            kept = max(0, len(self._encoder.windows) - drop) * self._encoder.window_tokens
            self._encoder.drop(drop)
            if drop == 1 and self._kv_next is not None and self._kv_next_tokens <= kept:
                self._kv, self._kv_tokens = self._kv_next, self._kv_next_tokens  # prepared in earlier updates
            else:
                self._kv, self._kv_tokens = None, 0  # positions shift: the decoder cache is rebuilt
            self._kv_next = None
        self._commit_text(self._audio_start)

    def _commit_text(self, upto: int) -> None:
        """Move the fixed text that was final once the samples before ``upto`` were fed out of the prompt."""
        target = None
        while self._snapshots and self._snapshots[0][0] <= upto:
            target = self._snapshots.popleft()[1]
        if target is not None:
            self._snapshots.appendleft((upto, target))  # still the best target for the next drop
        meta = self._meta()
        if target is None or meta is None or not self._raw.startswith(meta):
            return
        fixed_live = self._fixed_raw[len(meta) :]
        cut = min(target - self._text_base, len(fixed_live), repeat_safe_length(self._fixed_raw) - len(meta))
        self._commit(meta, _at_space(fixed_live, cut))

    def _cap_text(self) -> None:
        """Bound the text in view: past ``max_prefix_tokens`` its oldest part is committed even if unfixed
        (only a model that runs away, or repeats without end, gets there)."""
        if self.max_prefix_tokens is None:
            return
        meta = self._meta()
        if meta is None:
            at = self._raw.find(ASR_TEXT_TAG)
            meta = self._raw[: at + len(ASR_TEXT_TAG)] if at >= 0 else ""
        live = self._raw[len(meta) :]
        count = len(self.tokenizer.encode(live))
        if count <= self.max_prefix_tokens:
            return
        keep = len(live) * (self.max_prefix_tokens * 3 // 4) // count
        self._commit(meta, _at_space(live, len(live) - keep))
        self.stats.forced_commits += 1

    def _commit(self, meta: str, cut: int) -> None:
        """Move ``cut`` characters of raw text (after the header ``meta``) from the prompt to the committed text."""
        live = self._raw[len(meta) :]
        if cut <= 0 or not self._raw.startswith(meta):
            return
        gone_raw = live[:cut]
        gone = parse_asr_output(meta + gone_raw, self.forced)[1]
        before = self._fixed_display()
        state = (self._committed, self._committed_space, self._raw, self._fixed_raw, list(self._prefixes))
        if gone:
            self._committed = self._join(gone, live)
            self._committed_space = gone_raw[-1].isspace()
        else:
            self._committed_space = self._committed_space or gone_raw[-1].isspace()
        head = meta + gone_raw
        fixed_live = self._fixed_raw[len(head) :] if self._fixed_raw.startswith(head) else ""
        self._raw = meta + live[cut:]
        self._fixed_raw = meta + fixed_live
        kept = [meta + p[len(head) :] if p.startswith(head) else meta for p in self._prefixes]
        self._prefixes = deque(kept, maxlen=self._prefixes.maxlen)
        if not self._fixed_display().startswith(before):  # re-joining changed the spacing: keep everything
            self._committed, self._committed_space, self._raw, self._fixed_raw, prefixes = state
            self._prefixes = deque(prefixes, maxlen=self._prefixes.maxlen)
            return
        self._text_base += cut
        self.stats.committed_chars += cut

    # ------------------------------------------------------------------ display
    def _meta(self) -> str | None:
        """The ``language X<asr_text>`` header of the fixed raw text ("" when forced or absent), None if unknown."""
        if self.forced:
            return ""
        at = self._fixed_raw.find(ASR_TEXT_TAG)
        if at >= 0:
            return self._fixed_raw[: at + len(ASR_TEXT_TAG)]
        head = self._fixed_raw.lstrip()[: len(_META_HEAD)]
        return None if _META_HEAD.startswith(head) or head.startswith(_META_HEAD) else ""

    def _text_part(self, raw: str) -> str:
        """The raw text after the header (what the parser turns into the text)."""
        if self.forced or ASR_TEXT_TAG not in raw:
            return raw
        return raw.split(ASR_TEXT_TAG, 1)[1]

    def _join(self, live: str, live_raw: str) -> str:
        """The committed text followed by ``live`` (parsed from raw text ``live_raw``), spaced as the raw was."""
        if not self._committed or not live:
            return self._committed or live
        space = self._committed_space or live_raw[:1].isspace()
        return self._committed + (" " if space else "") + live

    def _fixed_display(self) -> str:
        meta = self._meta()
        if meta is None:
            return self._committed
        safe = self._fixed_raw[: repeat_safe_length(self._fixed_raw)]
        if len(safe) < len(meta):
            return self._committed
        return self._join(parse_asr_output(safe, self.forced)[1], safe[len(meta) :])

    def _display(self, final: bool) -> tuple[str, str, str]:
        language, live = parse_asr_output(self._raw, self.forced)
        text = self._join(live, self._text_part(self._raw))
        old = self._last.fixed
        if not text.startswith(old):
            self.stats.rewrites_blocked += 1
            text = old + text[len(old) :]
        fixed = text if final else self._fixed_display()
        if not (fixed.startswith(old) and text.startswith(fixed)):
            fixed = old
        return language, text, fixed
