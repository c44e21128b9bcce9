"""The ``mlx-asr`` command line: transcribe, batch, benchmark, info."""

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

ModelOpt = typer.Option(..., "--model", "-m", help="Model folder (official or converted) or Hugging Face repo id.")
BackendOpt = typer.Option(None, "--backend", help="mlx or torch (default: mlx on Apple Silicon, else torch).")
DeviceOpt = typer.Option(None, "--device", help="cpu, metal or cuda (default: the best available).")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's).")
LanguageOpt = typer.Option("auto", "--language", "-l", help="auto, a language name (English) or code (en).")
ContextOpt = typer.Option("", "--context", help="Background text (names, terms) to help recognition.")
MaxTokensOpt = typer.Option(512, "--max-new-tokens", min=1, help="Most tokens to generate per piece.")
QuantizeOpt = typer.Option(None, "--quantize", help="torch backend: int8 (8) or int4 (4) weights for the LLM.")
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


def _load_pipeline(model: str, backend, device, dtype, quantize=None, threads=None):
    from .pipeline import AsrPipeline

    options: dict[str, Any] = {}
    if quantize is not None:
        options["quantize"] = quantize
    if threads is not None:
        options["threads"] = threads
    return AsrPipeline.from_pretrained(model, backend=backend, device=device, dtype=dtype, **options)


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
    quantize: int = QuantizeOpt,
    threads: int = ThreadsOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
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
        pipe = _load_pipeline(model, backend, device, dtype, quantize, threads)
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
    quantize: int = QuantizeOpt,
    threads: int = ThreadsOpt,
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
        pipe = _load_pipeline(model, backend, device, dtype, quantize, threads)
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
    quantize: int = QuantizeOpt,
    threads: int = ThreadsOpt,
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
        pipe = _load_pipeline(model, backend, device, dtype, quantize, threads)
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
