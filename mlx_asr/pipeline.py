"""AsrPipeline: audio -> log-mel -> encoder -> LLM -> (language, text), timed stage by stage."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .audio import AudioInput, duration, load_audio
from .backends import Backend, Step, create_backend, resolve_backend
from .checkpoint import Checkpoint, open_checkpoint
from .chunking import MAX_SECONDS, split_audio
from .config import num_audio_tokens
from .errors import AsrError, ModelError
from .languages import resolve_language
from .mel import num_frames
from .prompt import STOP_IDS, build_prompt_ids, merge_languages, parse_asr_output
from .tokenizer import QwenTokenizer

if TYPE_CHECKING:
    from .streaming import StreamingSession

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class Timings:
    """Seconds spent in each stage (``load`` is the model load, reported once per pipeline)."""

    load: float = 0.0
    audio: float = 0.0
    features: float = 0.0
    encoder: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        """Processing time of one transcription (everything but the model load)."""
        return self.audio + self.features + self.encoder + self.prefill + self.decode

    def add(self, other: Timings) -> None:
        for name in ("audio", "features", "encoder", "prefill", "decode"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Transcription:
    """A detailed result: text, language, generated ids, confidence, duration and stage timings.

    ``confidence`` is the mean probability the model gave to the transcript tokens it chose
    (the stop token excluded); ``None`` when nothing was generated.
    """

    text: str
    language: str
    tokens: list[int]
    duration: float
    timings: Timings
    raw: str = ""
    confidence: float | None = None
    stop_reason: str = "eos"
    pieces: int = 1
    logprobs: list[float] = field(default_factory=list, repr=False)

    @property
    def rtf(self) -> float:
        """Real-time factor: processing time / audio duration."""
        return self.timings.total / self.duration if self.duration > 0 else math.inf

    @property
    def tokens_per_second(self) -> float:
        """Decoded tokens per second of decode time (the first token belongs to the prefill)."""
        n = max(len(self.logprobs) - 1, 0)
        return n / self.timings.decode if self.timings.decode > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (used by ``--format json``)."""
        return {
            "text": self.text,
            "language": self.language,
            "confidence": self.confidence,
            "tokens": self.tokens,
            "duration": round(self.duration, 4),
            "timings": {k: round(v, 4) for k, v in asdict(self.timings).items()},
            "rtf": round(self.rtf, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "stop_reason": self.stop_reason,
            "pieces": self.pieces,
        }


@contextmanager
def _collector_paused(freeze: bool) -> Iterator[None]:
    """Pause the cyclic garbage collector while loading; with ``freeze``, :func:`gc.freeze` at the end.

    Importing torch and building the model allocate ~10^5 long-lived objects, and every collection that
    runs in between rescans all of them: 0.15-0.2 s of a cold start (measured on 2 Zen 4 cores).
    Without ``freeze`` the first collection after loading still scans the newly loaded objects once.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


def _resolve_model_path(model: str | Path) -> Path:
    """A local folder as is; ``org/name`` that is not a folder is fetched from the Hugging Face hub."""
    path = Path(model).expanduser()
    if path.exists() or str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface-hub is a dependency
        raise ModelError(f"{model}: not a folder, and huggingface-hub is not installed") from exc
    try:
        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"{model}: not a local folder and not in the Hugging Face cache, and the hub cannot be reached; "
            "download it on a connected machine or pass a local model folder"
        ) from exc
    except Exception as exc:
        raise ModelError(f"{model}: could not fetch from the Hugging Face hub ({exc})") from exc


class AsrPipeline:
    """Speech recognition with a Qwen3-ASR model on the MLX or PyTorch backend.

    >>> pipe = AsrPipeline.from_pretrained("Qwen3-ASR-0.6B")   # doctest: +SKIP
    >>> pipe.transcribe("speech.wav")                           # doctest: +SKIP
    """

    def __init__(self, checkpoint: Checkpoint, backend: Backend, tokenizer: QwenTokenizer, load_time: float):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.backend = backend
        self.tokenizer = tokenizer
        self.load_time = load_time

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        backend: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        freeze_gc: bool = False,
        **options: Any,
    ) -> AsrPipeline:
        """Load a Qwen3-ASR folder (official or converted) or Hugging Face repo id.

        ``backend``: ``"mlx"``, ``"torch"`` or ``None`` (MLX on Apple Silicon, else PyTorch; always MLX for
        a folder quantized by ``mlx-asr convert``, which only MLX loads).
        ``device``: ``"cpu"``, ``"metal"``, ``"cuda"`` or ``None`` (the best available).
        ``dtype``: compute dtype ``float32``/``bfloat16``/``float16``; ``None`` keeps the checkpoint's.
        ``freeze_gc``: move every object alive after loading to the garbage collector's permanent generation
        (:func:`gc.freeze`), so that no later collection, nor the interpreter's exit, scans the ~10^5 objects
        of torch and the model again (0.3 s less for a command-line run); cyclic garbage alive at that
        moment is then never freed. The command line sets it; an application that loads once may too.
        Other keyword options go to the backend (``quantize`` for both; torch: ``threads``, ``quantize_audio``).
        """
        with _collector_paused(freeze_gc):
            return cls._load(model, backend, device, dtype, **options)

    @classmethod
    def _load(cls, model: str | Path, backend: str | None, device: str | None, dtype: str | None, **options: Any):
        start = time.perf_counter()
        requested = backend, device
        backend, device = resolve_backend(backend, device)
        checkpoint = open_checkpoint(_resolve_model_path(model))
        if requested[0] in (None, "auto") and backend != "mlx" and checkpoint.is_quantized and requested[1] != "cuda":
            backend, device = resolve_backend("mlx", requested[1])
        dtype = dtype or _checkpoint_dtype(checkpoint)
        tokenizer = QwenTokenizer.from_dir(checkpoint.path)
        engine = create_backend(checkpoint, backend, device, dtype, **options)
        return cls(checkpoint, engine, tokenizer, time.perf_counter() - start)

    # ------------------------------------------------------------------ single clips
    def transcribe(self, audio: AudioInput, **kwargs: Any) -> str:
        """Transcribe one recording and return its text (see :meth:`transcribe_detailed`)."""
        return self.transcribe_detailed(audio, **kwargs).text

    def transcribe_detailed(
        self,
        audio: AudioInput,
        language: str | None = None,
        context: str = "",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        min_new_tokens: int = 0,
        chunk_seconds: float = MAX_SECONDS,
        sample_rate: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Transcription:
        """Transcribe one recording: a path, audio-file bytes, or an array with ``sample_rate``.

        ``language``: ``None``/``"auto"`` to detect, else a name or ISO code (forces the output language).
        ``context``: background text (names, terms) placed in the system turn.
        Audio longer than ``chunk_seconds`` (default 1200 s, the official limit) is cut at quiet
        points and the pieces' texts are joined as the official package does.
        ``progress(done, total)`` is called after each piece.
        """
        forced = resolve_language(language)
        t0 = time.perf_counter()
        samples = load_audio(audio, sample_rate)
        load_seconds = time.perf_counter() - t0
        pieces = split_audio(samples, chunk_seconds)
        results = []
        for i, piece in enumerate(pieces):
            results.append(self._transcribe_samples(piece.samples, forced, context, max_new_tokens, min_new_tokens))
            if progress is not None:
                progress(i + 1, len(pieces))
        merged = _merge(results, duration(samples), forced)
        merged.timings.audio += load_seconds
        return merged

    def _prompt(self, samples: np.ndarray, forced: str | None, context: str) -> list[int]:
        n_tokens = num_audio_tokens(num_frames(samples.shape[0]), self.config.audio.chunk_frames)
        return build_prompt_ids(self.tokenizer, n_tokens, self.config.audio_token_id, context, forced)

    def encode(self, samples: np.ndarray, timings: Timings) -> Any:
        """Log-mel then audio tower of 16 kHz samples, timed into ``timings``."""
        return self.encode_batch([samples], [timings])[0]

    def encode_batch(self, clips: Sequence[np.ndarray], timings: Sequence[Timings]) -> list[Any]:
        """:meth:`encode` of several clips; they share the encoder's matrix products, whose time is split
        evenly between their ``timings``."""
        mels = []
        for samples, t in zip(clips, timings, strict=True):
            t0 = time.perf_counter()
            mels.append(self.backend.log_mel(samples))
            self.backend.synchronize()
            t.features += time.perf_counter() - t0
        t0 = time.perf_counter()
        embeds = self.backend.encode_batch(mels)
        self.backend.synchronize()
        for t in timings:
            t.encoder += (time.perf_counter() - t0) / len(clips)
        return embeds

    def _transcribe_samples(
        self, samples: np.ndarray, forced: str | None, context: str, max_new_tokens: int, min_new_tokens: int
    ) -> Transcription:
        timings = Timings()
        embeds = self.encode(samples, timings)
        prompt = self._prompt(samples, forced, context)
        steps: list[Step] = []
        t0 = time.perf_counter()
        for step in self.backend.generate(prompt, embeds, max_new_tokens, STOP_IDS, min_new_tokens):
            if not steps:
                timings.prefill = time.perf_counter() - t0
            steps.append(step)
        timings.decode = time.perf_counter() - t0 - timings.prefill
        return self._result(steps, duration(samples), timings, forced)

    def _result(self, steps: list[Step], seconds: float, timings: Timings, forced: str | None) -> Transcription:
        stopped = bool(steps) and steps[-1].token in STOP_IDS
        kept = steps[:-1] if stopped else steps
        tokens = [s.token for s in kept]
        raw = self.tokenizer.decode(tokens)
        language, text = parse_asr_output(raw, forced)
        probs = [math.exp(s.logprob) for s in kept]
        return Transcription(
            text=text,
            language=language,
            tokens=tokens,
            duration=seconds,
            timings=timings,
            raw=raw,
            confidence=sum(probs) / len(probs) if probs else None,
            stop_reason="eos" if stopped else "max_new_tokens",
            logprobs=[s.logprob for s in steps],
        )

    # ------------------------------------------------------------------ live audio
    def stream(self, language: str | None = None, context: str = "", **options: Any) -> StreamingSession:
        """Start a streaming transcription: ``feed(samples, sample_rate)`` pieces, then ``finish()``.

        ``options``: ``mode`` (``"cached"``, default, or ``"exact"``: the official algorithm),
        ``chunk_seconds`` (2), ``unfixed_chunks`` (2), ``rollback_tokens`` (5), ``max_new_tokens`` (32 per
        update) and ``context_seconds`` (audio in view; default 16 s cached, unbounded exact). See
        :mod:`mlx_asr.streaming` for the algorithm, the fixed-text guarantee and the memory policy.
        """
        from .streaming import StreamingSession

        return StreamingSession(self, language=language, context=context, **options)

    # ------------------------------------------------------------------ many clips
    def transcribe_batch(
        self,
        audios: Sequence[AudioInput],
        batch_size: int = 1,
        language: str | None = None,
        context: str = "",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        min_new_tokens: int = 0,
        chunk_seconds: float = MAX_SECONDS,
        on_result: Callable[[int, Transcription | AsrError], None] | None = None,
    ) -> list[Transcription | AsrError]:
        """Transcribe several recordings; results come back in input order.

        A recording that fails (unreadable audio, ...) yields its :class:`AsrError` in its slot and
        the others go on. ``batch_size`` > 1 decodes that many recordings through the LLM together
        (same tokens as one by one). ``on_result(index, result)`` is called as each one finishes.
        """
        forced = resolve_language(language)
        results: list[Transcription | AsrError | None] = [None] * len(audios)
        for group in _groups(range(len(audios)), batch_size):
            for index, result in self._transcribe_group(
                audios, group, forced, context, max_new_tokens, min_new_tokens, chunk_seconds
            ):
                results[index] = result
                if on_result is not None:
                    on_result(index, result)
        return results  # type: ignore[return-value]

    def _transcribe_group(self, audios, group, forced, context, max_new_tokens, min_new_tokens, chunk_seconds):
        loaded: list[tuple[int, np.ndarray, float]] = []
        for index in group:
            try:
                t0 = time.perf_counter()
                loaded.append((index, load_audio(audios[index]), time.perf_counter() - t0))
            except AsrError as exc:
                yield index, exc
        together = [item for item in loaded if duration(item[1]) <= chunk_seconds]
        if len(together) < 2:
            together = []
        for index, samples, seconds in loaded:
            if not any(index == other[0] for other in together):
                parts = [
                    self._transcribe_samples(p.samples, forced, context, max_new_tokens, min_new_tokens)
                    for p in split_audio(samples, chunk_seconds)
                ]
                merged = _merge(parts, duration(samples), forced)
                merged.timings.audio += seconds
                yield index, merged
        if together:
            yield from self._decode_together(together, forced, context, max_new_tokens, min_new_tokens)

    def _decode_together(self, loaded, forced, context, max_new_tokens, min_new_tokens):
        timings = [Timings(audio=seconds) for _, _, seconds in loaded]
        embeds = self.encode_batch([samples for _, samples, _ in loaded], timings)
        prompts = [self._prompt(samples, forced, context) for _, samples, _ in loaded]
        t0 = time.perf_counter()
        outputs = self.backend.generate_batch(prompts, embeds, max_new_tokens, STOP_IDS, min_new_tokens)
        share = (time.perf_counter() - t0) / len(loaded)
        for (index, samples, _), steps, t in zip(loaded, outputs, timings, strict=True):
            t.decode = share
            yield index, self._result(steps, duration(samples), t, forced)


def _groups(items: Iterable[int], size: int) -> Iterable[list[int]]:
    group: list[int] = []
    for item in items:
        group.append(item)
        if len(group) == max(1, size):
            yield group
            group = []
    if group:
        yield group


def _merge(parts: list[Transcription], seconds: float, forced: str | None) -> Transcription:
    """Join the pieces of one recording as the official package does (texts glued, languages merged)."""
    if len(parts) == 1:
        return parts[0]
    timings = Timings()
    for p in parts:
        timings.add(p.timings)
    probs = [math.exp(lp) for p in parts for lp in p.logprobs[: len(p.tokens)]]
    return Transcription(
        text="".join(p.text for p in parts),
        language=forced or merge_languages([p.language for p in parts]),
        tokens=[t for p in parts for t in p.tokens],
        duration=seconds,
        timings=timings,
        raw="".join(p.raw for p in parts),
        confidence=sum(probs) / len(probs) if probs else None,
        stop_reason=parts[-1].stop_reason,
        pieces=len(parts),
        logprobs=[lp for p in parts for lp in p.logprobs],
    )


def _checkpoint_dtype(checkpoint: Checkpoint) -> str:
    dtype = checkpoint.config.dtype
    return dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16"
