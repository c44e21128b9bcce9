"""The official chat prompt, and the parser of the model's raw output into (language, text)."""

from __future__ import annotations

from .languages import normalize_language_name
from .tokenizer import QwenTokenizer

ASR_TEXT_TAG = "<asr_text>"
AUDIO_PAD = "<|audio_pad|>"
IM_END_ID = 151645
ENDOFTEXT_ID = 151643
STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)
REPETITION_THRESHOLD = 20


def prompt_text(context: str = "", language: str | None = None) -> str:
    """The chat template rendered as the official wrapper does (system turn always present)."""
    text = (
        f"<|im_start|>system\n{context}<|im_end|>\n"
        f"<|im_start|>user\n<|audio_start|>{AUDIO_PAD}<|audio_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    if language:
        text += f"language {language}{ASR_TEXT_TAG}"
    return text


def build_prompt_ids(
    tokenizer: QwenTokenizer,
    num_audio_tokens: int,
    audio_token_id: int,
    context: str = "",
    language: str | None = None,
) -> list[int]:
    """Prompt ids with the single ``<|audio_pad|>`` expanded to ``num_audio_tokens`` copies."""
    ids = tokenizer.encode(prompt_text(context, language))
    at = ids.index(audio_token_id)
    return ids[:at] + [audio_token_id] * num_audio_tokens + ids[at + 1 :]


def _fix_char_repeats(s: str, threshold: int) -> str:
    """Collapse any run of more than ``threshold`` equal characters to one character."""
    out: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(s[i] if j - i > threshold else s[i:j])
        i = j
    return "".join(out)


def _find_repeat(s: str, threshold: int, max_len: int) -> tuple[int, int] | None:
    """First (position, period) where a pattern of 1..max_len chars repeats ``threshold`` times."""
    n = len(s)
    for i in range(n - 2 * threshold + 1):
        for k in range(1, max_len + 1):
            if i + k * threshold > n:
                break
            pattern = s[i : i + k]
            if all(s[i + r * k : i + (r + 1) * k] == pattern for r in range(1, threshold)):
                return i, k
    return None


def _fix_pattern_repeats(s: str, threshold: int, max_len: int = 20) -> str:
    """Keep one copy of the first pattern repeated ``threshold``+ times, then go on after the run."""
    out: list[str] = []
    while len(s) >= 2 * threshold and (hit := _find_repeat(s, threshold, max_len)) is not None:
        i, k = hit
        end = i + threshold * k
        while end + k <= len(s) and s[end : end + k] == s[i : i + k]:
            end += k
        out.append(s[: i + k])
        s = s[end:]
    out.append(s)
    return "".join(out)


def fix_repetitions(text: str, threshold: int = REPETITION_THRESHOLD) -> str:
    """The official post-filter for runaway repetitions (``detect_and_fix_repetitions``)."""
    return _fix_pattern_repeats(_fix_char_repeats(text, threshold), threshold)


def parse_asr_output(raw: str, forced_language: str | None = None) -> tuple[str, str]:
    """Split the model's raw output ``language X<asr_text>text`` into ``(language, text)``.

    With a forced language the whole output is the text. ``language None`` means no speech.
    """
    s = (raw or "").strip()
    if not s:
        return "", ""
    s = fix_repetitions(s)
    if forced_language:
        return forced_language, s
    if ASR_TEXT_TAG not in s:
        return "", s.strip()
    meta, text = s.split(ASR_TEXT_TAG, 1)
    if "language none" in meta.lower():
        return "", text.strip()
    language = ""
    for line in meta.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.lower().startswith("language "):
            value = line[len("language ") :].strip()
            if value:
                language = normalize_language_name(value)
        break
    return language, text.strip()


def merge_languages(languages: list[str]) -> str:
    """Comma-join per-piece languages, dropping empties and consecutive duplicates (official merge)."""
    out: list[str] = []
    for lang in (x.strip() for x in languages):
        if lang and (not out or out[-1] != lang):
            out.append(lang)
    return ",".join(out)
