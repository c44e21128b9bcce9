"""The ``mlx-asr`` command line: transcribe, listen, batch, benchmark, info, convert."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .errors import AsrError, AudioError

app = typer.Typer(
    name="mlx-asr",
    help="Qwen3-ASR speech recognition: MLX on Apple Silicon, PyTorch on CPU and CUDA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".webm", ".mp4")
EXIT_USAGE = 2
EXIT_FAILED_ITEMS = 7
EXIT_INTERRUPTED = 130
OWNS_PROCESS = False  # set by main(): a command run from the shell freezes the garbage collector after loading

ModelOpt = typer.Option(..., "--model", "-m", help="Model folder (official or converted) or Hugging Face repo id.")
BackendOpt = typer.Option(None, "--backend", help="mlx or torch (default: mlx on Apple Silicon, else torch).")
DeviceOpt = typer.Option(None, "--device", help="cpu, metal or cuda (default: the best available).")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's).")
LanguageOpt = typer.Option("auto", "--language", "-l", help="auto, a language name (English) or code (en).")
ContextOpt = typer.Option("", "--context", help="Background text (names, terms) to help recognition.")
MaxTokensOpt = typer.Option(512, "--max-new-tokens", min=1, help="Most tokens to generate per piece.")
QuantizeOpt = typer.Option(
    None,
    "--quantize",
    help="Quantize at load: 8 or 4 (LLM weight bits; mlx: encoder/embeddings 8), or w8a8 (torch on x86 CPUs: "
    "int8 weights and activations, fastest there).",
)
QuantizeAudioOpt = typer.Option(
    False,
    "--quantize-audio",
    help="torch on x86 CPUs: the audio encoder's linears in w8a8 too (faster, less memory; convolutions stay float).",
)
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch backend: CPU threads.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Per-stage timings on stderr.")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"mlx-asr: error: {message}", err=True)
    return typer.Exit(code)


def _run(fn: Callable[[], int | None]) -> None:
    """Run a command body: typed errors become one line on stderr and their exit code, never a traceback."""
    try:
        code = fn()
    except AsrError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("mlx-asr: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except MemoryError:
        raise _fail("out of memory (try a quantized model or a smaller --batch-size)", 1) from None
    if code:
        raise typer.Exit(code)


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _load_pipeline(model: str, backend, device, dtype, quantize=None, threads=None, quantize_audio=False):
    from .pipeline import AsrPipeline

    options: dict[str, Any] = {"quantize_audio": True} if quantize_audio else {}
    if quantize is not None:
        options["quantize"] = int(quantize) if quantize.isdigit() else quantize.lower()
    if threads is not None:
        options["threads"] = threads
    return AsrPipeline.from_pretrained(
        model, backend=backend, device=device, dtype=dtype, freeze_gc=OWNS_PROCESS, **options
    )


def _read_audio_arg(path: str) -> Any:
    """A path, or ``-`` for audio-file bytes on standard input."""
    if path != "-":
        return path
    data = sys.stdin.buffer.read()
    if not data:
        raise AudioError("-: no audio on standard input")
    return data


def _timings_line(name: str, result) -> str:
    t = result.timings
    return (
        f"{name}: {result.duration:.2f} s audio, rtf {result.rtf:.3f} | audio {t.audio:.3f} s, "
        f"features {t.features:.3f} s, encoder {t.encoder:.3f} s, prefill {t.prefill:.3f} s, "
        f"decode {t.decode:.3f} s ({len(result.tokens)} tokens, {result.tokens_per_second:.1f} tok/s)"
    )


def _result_json(pipe, name: str, result) -> dict[str, Any]:
    data = {"file": name, **result.to_dict()}
    data.update(model=str(pipe.checkpoint.path), backend=pipe.backend.name, device=pipe.backend.device,
                dtype=pipe.backend.dtype, load_time=round(pipe.load_time, 4))
    return data


@app.command()
def transcribe(
    model: str = ModelOpt,
    audio: list[str] = typer.Option([], "--audio", "-a", help="Audio file(s); '-' reads standard input."),
    files: list[str] = typer.Argument(None, help="More audio files.", show_default=False),
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    language: str = LanguageOpt,
    context: str = ContextOpt,
    max_new_tokens: int = MaxTokensOpt,
    min_new_tokens: int = typer.Option(0, "--min-new-tokens", min=0, help="Decode at least this many tokens."),
    chunk_seconds: float = typer.Option(1200.0, "--chunk-seconds", min=1.0, help="Cut longer audio into pieces."),
    output_format: str = typer.Option("txt", "--format", "-f", help="txt or json."),
    output: Path = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    normalize: bool = typer.Option(False, "--normalize", help="Apply the benchmark's text normaliser."),
    quantize: str = QuantizeOpt,
    threads: int = ThreadsOpt,
    quantize_audio: bool = QuantizeAudioOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
    stream: bool = typer.Option(False, "--stream", help="Print partial results as a stream produces them."),
    stream_mode: str = typer.Option("cached", "--stream-mode", help="With --stream: cached or exact (official)."),
) -> None:
    """Transcribe audio files and print the text.

    Examples:

      mlx-asr transcribe -m Qwen3-ASR-0.6B -a speech.wav

      mlx-asr transcribe -m ./model -a talk.mp3 --language en --format json -o talk.json

      cat clip.flac | mlx-asr transcribe -m ./model -a -
    """
    sources = list(audio) + list(files or [])

    def body() -> int:
        if not sources:
            raise _fail("no audio given: use --audio FILE (or '-' for standard input)", EXIT_USAGE)
        if output_format not in ("txt", "json"):
            raise _fail(f"unknown --format {output_format!r}; choose txt or json", EXIT_USAGE)
        if sources.count("-") > 1:
            raise _fail("standard input ('-') can be read only once", EXIT_USAGE)
        from .languages import resolve_language
        from .textnorm import normalize_text

        resolve_language(language)
        if stream:
            options = _stream_options(stream_mode, 2.0, 2, 5, min(max_new_tokens, 32), None)
            pipe = _load_pipeline(model, backend, device, dtype, quantize, threads, quantize_audio)
            return _stream_files(pipe, sources, language, context, options, output_format, output, verbose)
        pipe = _load_pipeline(model, backend, device, dtype, quantize, threads, quantize_audio)
        records, failed = [], 0
        for source in sources:
            try:
                result = _transcribe_one(pipe, source, language, context, max_new_tokens, min_new_tokens,
                                         chunk_seconds, _show_progress(quiet))
            except AudioError as exc:
                if len(sources) == 1:
                    raise
                typer.echo(f"mlx-asr: error: {exc}", err=True)
                failed += 1
                continue
            if normalize:
                result.text = normalize_text(result.text)
            if verbose:
                typer.echo(_timings_line(source, result), err=True)
            records.append((source, result))
        _write_transcripts(pipe, records, output_format, output, several=len(sources) > 1)
        return EXIT_FAILED_ITEMS if failed else 0

    _run(body)


def _transcribe_one(pipe, source, language, context, max_new_tokens, min_new_tokens, chunk_seconds, progress):
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="piece", desc=Path(source).name, file=sys.stderr, leave=False)

    def on_piece(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        return pipe.transcribe_detailed(_read_audio_arg(source), language=language, context=context,
                                        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                        chunk_seconds=chunk_seconds, progress=on_piece)
    finally:
        if bar is not None:
            bar.close()


def _write_transcripts(pipe, records, output_format: str, output: Path | None, several: bool) -> None:
    if output_format == "json":
        items = [_result_json(pipe, name, r) for name, r in records]
        text = json.dumps(items if several else items[0], ensure_ascii=False, indent=2) + "\n"
    elif not several:
        text = records[0][1].text + "\n"
    else:
        text = "".join(f"{name}\t{r.text}\n" for name, r in records)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise _fail(f"{output}: cannot write ({exc.strerror})", 1) from None


# ---------------------------------------------------------------------------------------------- streaming
def _cells(text: str) -> int:
    """Terminal columns of ``text`` (East Asian wide characters take two, combining marks none)."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


class _StreamPrinter:
    """Shows stream updates: ``live`` rewrites the unfixed tail in place (a terminal), ``lines`` appends each
    newly fixed piece as a line, ``jsonl`` writes every update as a JSON object."""

    def __init__(self, out, style: str) -> None:
        self.out = out
        self.style = style
        self.printed = ""  # fixed text already written
        self.column = 0  # terminal cells written on the current line before the unfixed tail (live)
        self.tail = 0  # cells of the unfixed tail on screen (live)

    def show(self, update, name: str | None = None) -> None:
        if self.style == "jsonl":
            row = {"language": update.language, "text": update.text, "fixed": update.fixed,
                   "unfixed": update.unfixed, "final": update.final, "chunk": update.chunk,
                   "audio_seconds": round(update.audio_seconds, 3), "seconds": round(update.seconds, 4)}
            self.out.write(json.dumps({"file": name, **row} if name else row, ensure_ascii=False) + "\n")
        elif self.style == "lines":
            piece = update.fixed[len(self.printed):]
            following = update.text[len(update.fixed) : len(update.fixed) + 1]
            if not update.final and piece and not piece[-1].isspace() and following and not following.isspace():
                space = max(piece.rfind(" "), piece.rfind("\n"))  # a word is cut: print up to the last space
                if space >= 0 or " " in update.fixed:
                    piece = piece[: space + 1]
            if piece.strip():
                self.out.write(piece.strip() + "\n")
            self.printed += piece
        else:
            self._live(update)
        self.out.flush()

    def _live(self, update) -> None:
        import shutil

        width = max(shutil.get_terminal_size().columns, 2)
        if self.tail:  # back to where the tail started, then clear to the end of the screen
            up = (self.column + self.tail - 1) // width - self.column // width
            right = self.column % width
            self.out.write((f"\x1b[{up}A" if up else "") + "\r" + (f"\x1b[{right}C" if right else ""))
        self.out.write("\x1b[J")
        fixed = update.fixed[len(self.printed):].replace("\n", " ")
        tail = update.unfixed.replace("\n", " ")
        self.out.write(fixed + (f"\x1b[2m{tail}\x1b[0m" if tail else ""))
        self.printed = update.fixed
        self.column += _cells(fixed)
        self.tail = _cells(tail)

    def close(self, update, name: str | None = None) -> None:
        """Show the final update and end the output."""
        self.show(update, name)
        if self.style == "live":
            self.out.write("\n")
            self.out.flush()
        self.printed, self.column, self.tail = "", 0, 0


def _printer_style(output_format: str, out) -> str:
    if output_format in ("json", "jsonl"):
        return "jsonl"
    tty = hasattr(out, "isatty") and out.isatty() and os.environ.get("TERM", "") != "dumb"
    return "live" if tty else "lines"


def _stream_options(mode: str, chunk: float, unfixed: int, rollback: int, max_new: int, context_seconds) -> dict:
    if mode not in ("cached", "exact"):
        raise _fail(f"unknown stream mode {mode!r}; choose cached or exact", EXIT_USAGE)
    options = dict(mode=mode, chunk_seconds=chunk, unfixed_chunks=unfixed, rollback_tokens=rollback,
                   max_new_tokens=max_new)
    if context_seconds is not None:
        options["context_seconds"] = context_seconds if context_seconds > 0 else None
    return options


def _timing_note(update) -> str:
    t = update.timings
    return (f"update {update.chunk}: {update.audio_seconds:.1f} s audio, {update.seconds:.3f} s "
            f"(encoder {t.encoder:.3f}, prefill {t.prefill:.3f} for {update.prefill_tokens} tokens, "
            f"decode {t.decode:.3f} for {update.new_tokens} tokens)")


def _stream_files(pipe, sources, language, context, options, output_format, output, verbose) -> int:
    """``transcribe --stream``: feed each file to a stream as fast as it decodes, showing every update."""
    from .audio import load_audio

    handle = output.open("w", encoding="utf-8") if output is not None else sys.stdout
    try:
        printer = _StreamPrinter(handle, _printer_style(output_format, handle))
        for source in sources:
            samples = load_audio(_read_audio_arg(source))
            if len(sources) > 1 and printer.style != "jsonl":
                handle.write(f"== {source}\n")
            session = pipe.stream(language=language, context=context, **options)
            name = source if printer.style == "jsonl" else None
            for update in session.iter_feed(samples):
                printer.show(update, name)
                if verbose:
                    typer.echo(_timing_note(update), err=True)
            printer.close(session.finish(), name)
    finally:
        if output is not None:
            handle.close()
    return 0


class _Stop:
    """Ctrl-C asks the listen loop to finish (the update in progress completes); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Stop:
        import signal

        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        import signal

        signal.signal(signal.SIGINT, self._previous)


def _file_blocks(path: Path, speed: float, stop: _Stop, block_seconds: float = 0.1):
    """Blocks of a file at its own sample rate and channels, paced ``speed`` x real time (0: no pacing).

    Paced, it behaves like a microphone: each read returns everything "recorded" since the last one
    (whole ``block_seconds`` blocks), so audio piles up while an update is being computed.
    """
    import time

    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception:  # formats libsndfile lacks: decode (and resample) like transcribe does
        from .audio import load_audio

        data, rate = load_audio(str(path))[:, None], 16000
    step = max(1, int(rate * block_seconds))
    if speed <= 0:
        for i in range(0, data.shape[0], step):
            if stop.requested:
                return
            yield data[i : i + step], rate
        return
    start, sent = time.monotonic(), 0
    while sent < data.shape[0] and not stop.requested:
        elapsed = time.monotonic() - start
        recorded = min(data.shape[0], int(elapsed * rate * speed) // step * step)
        if recorded <= sent:
            time.sleep(max(0.001, min(0.05, (sent + step) / rate / speed - elapsed)))
            continue
        yield data[sent:recorded], rate
        sent = recorded


class _Microphone:
    """A sounddevice input at the device's default rate; constructing it checks sounddevice and the device."""

    def __init__(self, device: str | None) -> None:
        try:
            import sounddevice as sd
        except ImportError:
            raise AudioError("listening to a microphone needs sounddevice: pip install 'mlx-asr[mic]' "
                             "(or simulate one with --input FILE --realtime)") from None
        except OSError as exc:
            raise AudioError(f"sounddevice cannot load the PortAudio library ({exc}); install PortAudio "
                             "(apt install libportaudio2, brew install portaudio) or use --input FILE") from None
        self.sd = sd
        self.device = int(device) if device is not None and device.isdigit() else device
        try:
            self.info = sd.query_devices(self.device, "input")
        except Exception as exc:
            where = f" {device!r}" if device else ""
            raise AudioError(f"no microphone{where} ({exc}); list the devices with python -m sounddevice, "
                             "or use --input FILE") from None
        self.rate = int(self.info["default_samplerate"])

    def blocks(self, stop: _Stop, block_seconds: float = 0.1):
        import queue

        import numpy as np

        blocks: queue.Queue = queue.Queue()

        def callback(indata, frames, time_info, status) -> None:
            blocks.put(indata.copy())

        try:
            stream = self.sd.InputStream(device=self.device, channels=1, samplerate=self.rate, dtype="float32",
                                         blocksize=max(1, int(self.rate * block_seconds)), callback=callback)
        except Exception as exc:
            raise AudioError(f"cannot open the microphone ({exc})") from None
        with stream:
            typer.echo(f"listening on {self.info['name']} at {self.rate} Hz; Ctrl-C to finish", err=True)
            while not stop.requested:
                try:
                    pending = [blocks.get(timeout=0.1)]
                except queue.Empty:
                    continue
                while not blocks.empty():  # all that arrived during the last update, as one piece
                    pending.append(blocks.get_nowait())
                yield np.concatenate(pending), self.rate
        while not blocks.empty():  # what arrived before the stream closed
            yield blocks.get_nowait(), self.rate


@app.command()
def listen(
    model: str = ModelOpt,
    input_file: Path = typer.Option(None, "--input", "-i", help="Simulate the microphone with this audio file."),
    realtime: bool = typer.Option(False, "--realtime", help="With --input: feed the file at real-time pace."),
    speed: float = typer.Option(None, "--speed", min=0.0, help="With --input: pace at this many x real time."),
    mic: str = typer.Option(None, "--mic", help="Microphone (sounddevice name or index; default: the system's)."),
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    language: str = LanguageOpt,
    context: str = ContextOpt,
    chunk_seconds: float = typer.Option(2.0, "--chunk-seconds", min=0.1, help="Audio per update."),
    mode: str = typer.Option("cached", "--mode", help="cached (bounded cost, runs forever) or exact (official)."),
    context_seconds: float = typer.Option(None, "--context-seconds", help="Audio the model sees (0: all)."),
    unfixed_chunks: int = typer.Option(2, "--unfixed-chunks", min=0, help="Chunks whose text stays unfixed."),
    rollback_tokens: int = typer.Option(5, "--rollback-tokens", min=0, help="Tokens re-decoded each update."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Most tokens decoded per update."),
    output_format: str = typer.Option("txt", "--format", "-f", help="txt or jsonl (every update)."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the final transcript to this file."),
    quantize: str = QuantizeOpt,
    threads: int = ThreadsOpt,
    quantize_audio: bool = QuantizeAudioOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Transcribe the microphone live; the text is printed as it stabilises.

    On a terminal the unfixed end is rewritten in place (dimmed); otherwise each newly fixed piece is
    printed as a line. Ctrl-C finishes: the last audio is decoded and the final transcript printed.
    When an update takes longer than a chunk (a slow machine), the audio that arrived meanwhile is
    decoded in one update, so the text keeps up with the speaker instead of falling behind.
    Needs sounddevice (the "mic" extra of mlx-asr) unless --input is given.

    Examples:

      mlx-asr listen -m ./Qwen3-ASR-0.6B --language en

      mlx-asr listen -m ./model --input talk.wav --realtime --format jsonl
    """

    def body() -> int:
        if output_format not in ("txt", "jsonl"):
            raise _fail(f"unknown --format {output_format!r}; choose txt or jsonl", EXIT_USAGE)
        if input_file is None and (realtime or speed is not None):
            raise _fail("--realtime and --speed simulate a microphone with --input FILE", EXIT_USAGE)
        if input_file is not None and not input_file.is_file():
            raise AudioError(f"{input_file}: file not found")
        from .languages import resolve_language

        resolve_language(language)
        options = _stream_options(mode, chunk_seconds, unfixed_chunks, rollback_tokens, max_new_tokens,
                                  context_seconds)
        microphone = _Microphone(mic) if input_file is None else None  # fails early, before the model loads
        pipe = _load_pipeline(model, backend, device, dtype, quantize, threads, quantize_audio)
        session = pipe.stream(language=language, context=context, catch_up=True, **options)
        printer = _StreamPrinter(sys.stdout, _printer_style(output_format, sys.stdout))
        with _Stop() as stop:
            if microphone is not None:
                blocks = microphone.blocks(stop)
            else:
                blocks = _file_blocks(input_file, speed if speed is not None else (1.0 if realtime else 0.0), stop)
            for samples, rate in blocks:
                for update in session.iter_feed(samples, rate):
                    printer.show(update)
                    if verbose:
                        typer.echo(_timing_note(update), err=True)
                if stop.requested:
                    break
            final = session.finish()
        printer.close(final)
        if verbose:
            s = session.stats
            typer.echo(f"{s.updates} updates, {final.audio_seconds:.1f} s audio, {s.dropped_seconds:.0f} s dropped "
                       f"from the context, {s.merged_chunks} chunks merged into later updates to keep up",
                       err=True)
        if output is not None:
            output.write_text(final.text + "\n", encoding="utf-8")
        return 0

    _run(body)



# ---------------------------------------------------------------------------------------------- batch
def _audio_files(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def _finished(output: Path) -> dict[str, dict]:
    """Results already in ``output`` (for --resume): only the successful ones count as finished."""
    if not output.exists():
        return {}
    text = output.read_text(encoding="utf-8")
    if output.suffix == ".json":
        rows = json.loads(text) if text.strip() else []
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    return {row["file"]: row for row in rows if "error" not in row}


class _ResultWriter:
    """Writes each result as soon as it is known: a JSON line appended, or the whole JSON array rewritten."""

    def __init__(self, output: Path, kept: list[dict]) -> None:
        self.output = output
        self.rows = list(kept)
        if output.suffix == ".json":
            self._rewrite()
        else:
            output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.output.suffix == ".json":
            self._rewrite()
        else:
            with self.output.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _rewrite(self) -> None:
        tmp = self.output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.output)


@app.command()
def batch(
    model: str = ModelOpt,
    input_dir: Path = typer.Option(..., "--input-dir", "-i", help="Folder of audio files."),
    output: Path = typer.Option(Path("results.jsonl"), "--output", "-o", help="results.jsonl or results.json"),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Include sub-folders."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Clips decoded together."),
    resume: bool = typer.Option(False, "--resume", help="Skip files already transcribed in --output."),
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    language: str = LanguageOpt,
    context: str = ContextOpt,
    max_new_tokens: int = MaxTokensOpt,
    quantize: str = QuantizeOpt,
    threads: int = ThreadsOpt,
    quantize_audio: bool = QuantizeAudioOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Transcribe every audio file in a folder into JSON Lines (or JSON), one record per file.

    Each result is written as soon as it is done, so an interrupted run loses nothing; --resume
    skips finished files. Failed files are recorded with their error and the run goes on.

    Example:

      mlx-asr batch -m ./model -i recordings/ -r -o results.jsonl --batch-size 4 --resume
    """

    def body() -> int:
        if not input_dir.exists():
            raise _fail(f"{input_dir}: folder not found", 3)
        if not input_dir.is_dir():
            raise _fail(f"{input_dir}: is a file, expected a folder (use transcribe for one file)", 3)
        if output.suffix not in (".json", ".jsonl"):
            raise _fail(f"--output {output}: use a .jsonl or .json file name", EXIT_USAGE)
        from .languages import resolve_language

        resolve_language(language)
        files = _audio_files(input_dir, recursive)
        done = _finished(output) if resume else {}
        todo = [f for f in files if str(f) not in done]
        writer = _ResultWriter(output, list(done.values()))
        if not todo:
            typer.echo(f"nothing to do: {len(files)} file(s), {len(done)} already done", err=True)
            return 0
        pipe = _load_pipeline(model, backend, device, dtype, quantize, threads, quantize_audio)
        failed = _run_batch(pipe, todo, writer, batch_size, language, context, max_new_tokens, quiet)
        typer.echo(f"{len(todo) - failed} transcribed, {failed} failed, {len(done)} skipped -> {output}", err=True)
        return EXIT_FAILED_ITEMS if failed else 0

    _run(body)


def _run_batch(pipe, todo, writer, batch_size, language, context, max_new_tokens, quiet) -> int:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="file", file=sys.stderr, disable=not _show_progress(quiet))
    failed = 0

    def on_result(index: int, result) -> None:
        nonlocal failed
        name = str(todo[index])
        if isinstance(result, AsrError):
            failed += 1
            writer.add({"file": name, "error": str(result)})
        else:
            writer.add(_result_json(pipe, name, result))
        bar.update(1)

    try:
        pipe.transcribe_batch([str(f) for f in todo], batch_size=batch_size, language=language, context=context,
                              max_new_tokens=max_new_tokens, on_result=on_result)
    finally:
        bar.close()
    return failed


# ---------------------------------------------------------------------------------------------- benchmark
@app.command()
def benchmark(
    model: str = ModelOpt,
    test_set: Path = typer.Option(None, "--test-set", help="LibriSpeech-style folder or JSONL manifest."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Speed mode on generated clips."),
    lengths: str = typer.Option("1,5,10,30,60", "--lengths", help="Synthetic clip lengths in seconds."),
    audio: Path = typer.Option(None, "--audio", help="Speed mode on this clip instead of generated audio."),
    runs: int = typer.Option(2, "--runs", min=1, help="Timed runs per clip (after one warm-up)."),
    min_new_tokens: int = typer.Option(0, "--min-new-tokens", min=0, help="Force this many decoded tokens."),
    max_new_tokens: int = MaxTokensOpt,
    stress: int = typer.Option(0, "--stress", min=0, help="Also transcribe N clips in a row and track memory."),
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    language: str = LanguageOpt,
    quantize: str = QuantizeOpt,
    threads: int = ThreadsOpt,
    quantize_audio: bool = QuantizeAudioOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Measure speed (RTF, per-stage times, tokens/s, memory) or accuracy (WER/CER) of a model.

    Examples:

      mlx-asr benchmark -m ./model --synthetic --min-new-tokens 40 --max-new-tokens 40

      mlx-asr benchmark -m ./model --test-set LibriSpeech/test-clean --json
    """
    from . import benchmark as bench

    def body() -> int:
        if (test_set is None) == (not synthetic and audio is None):
            raise _fail("choose one of --test-set DIR, --synthetic or --audio FILE", EXIT_USAGE)
        pipe = _load_pipeline(model, backend, device, dtype, quantize, threads, quantize_audio)
        if test_set is not None:
            report = bench.accuracy(pipe, test_set, language=language, max_new_tokens=max_new_tokens)
        else:
            secs = [float(x) for x in lengths.split(",") if x.strip()]
            report = bench.speed(pipe, secs, audio=audio, runs=runs, language=language,
                                 min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens)
        if stress:
            report["stress"] = bench.stress(pipe, stress, language=language, max_new_tokens=max_new_tokens)
        typer.echo(json.dumps(report, indent=2) if as_json else bench.format_report(report))
        return 0

    _run(body)


# ---------------------------------------------------------------------------------------------- info
@app.command()
def info(model: str = ModelOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Describe a model folder: sizes, dtype, quantization, languages.

    Example:

      mlx-asr info -m ./Qwen3-ASR-0.6B
    """
    from .info import describe, format_description

    def body() -> int:
        from .pipeline import _resolve_model_path

        desc = describe(_resolve_model_path(model))
        typer.echo(json.dumps(desc, indent=2) if as_json else format_description(desc))
        return 0

    _run(body)


# ---------------------------------------------------------------------------------------------- convert
@app.command()
def convert(
    source: str = typer.Argument(..., help="Official Qwen3-ASR folder or Hugging Face repo id.", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="MLX model folder to write."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float16, bfloat16 or float32 weights (and scales)."),
    quantize: int = typer.Option(None, "--quantize", help="4 or 8: bits of the LLM linear layers (default: none)."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size: 32, 64 or 128."),
    audio_bits: str = typer.Option("8", "--audio-bits", help="Audio encoder linears when quantizing: 8, 4 or none."),
    embed_bits: str = typer.Option("8", "--embed-bits", help="Token embedding (= tied output head): 8, 4 or none."),
    head_bits: str = typer.Option("same", "--head-bits", help="Untied lm_head: 8, 4, none or same (as embeddings)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    quiet: bool = QuietOpt,
) -> None:
    """Convert an official Qwen3-ASR folder into an MLX folder, optionally 4/8-bit quantized.

    The policy and sizes are printed; config.json and README.md in the output record them.

    Examples:

      mlx-asr convert ./Qwen3-ASR-1.7B -o ./Qwen3-ASR-1.7B-mlx-4bit --quantize 4

      mlx-asr convert Qwen/Qwen3-ASR-0.6B -o ./Qwen3-ASR-0.6B-mlx --dtype float16
    """

    def body() -> int:
        from .convert import convert as run_convert
        from .quantize import QuantPolicy

        policy = None
        if quantize is not None:
            policy = QuantPolicy.create(quantize, group_size, audio_bits, embed_bits, head_bits)
        result = run_convert(source, output, dtype=dtype, policy=policy, force=force, progress=_show_progress(quiet))
        typer.echo("\n".join(result.lines()))
        return 0

    _run(body)


def main() -> None:
    """Console-script entry point; the command owns its process (``freeze_gc`` when loading a model)."""
    global OWNS_PROCESS
    OWNS_PROCESS = True
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
