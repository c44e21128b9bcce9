"""The 30 languages Qwen3-ASR names, their ISO codes, and the official name normalisation."""

from __future__ import annotations

from .errors import LanguageError

# Official order (qwen_asr SUPPORTED_LANGUAGES / config.json "support_languages") with ISO codes.
LANGUAGES: dict[str, str] = {
    "Chinese": "zh", "English": "en", "Cantonese": "yue", "Arabic": "ar", "German": "de",
    "French": "fr", "Spanish": "es", "Portuguese": "pt", "Indonesian": "id", "Italian": "it",
    "Korean": "ko", "Russian": "ru", "Thai": "th", "Vietnamese": "vi", "Japanese": "ja",
    "Turkish": "tr", "Hindi": "hi", "Malay": "ms", "Dutch": "nl", "Swedish": "sv",
    "Danish": "da", "Finnish": "fi", "Polish": "pl", "Czech": "cs", "Filipino": "fil",
    "Persian": "fa", "Greek": "el", "Romanian": "ro", "Hungarian": "hu", "Macedonian": "mk",
}
_BY_CODE = {code: name for name, code in LANGUAGES.items()}
AUTO = ("", "auto", "none", "detect")


def normalize_language_name(language: str) -> str:
    """Official normalisation: first letter upper case, the rest lower case (``'cHINese'`` -> ``'Chinese'``)."""
    s = str(language).strip()
    return s[:1].upper() + s[1:].lower()


def resolve_language(language: str | None) -> str | None:
    """Map a user's language (name in any case, ISO code, or ``auto``) to the official name.

    Returns ``None`` for automatic detection; raises :class:`LanguageError` listing the valid choices.
    """
    if language is None or language.strip().lower() in AUTO:
        return None
    key = language.strip()
    if key.lower() in _BY_CODE:
        return _BY_CODE[key.lower()]
    name = normalize_language_name(key)
    if name in LANGUAGES:
        return name
    choices = ", ".join(f"{n} ({c})" for n, c in LANGUAGES.items())
    raise LanguageError(f"unsupported language {language!r}; use auto or one of: {choices}")


def language_code(name: str) -> str | None:
    """ISO code of an official language name, or ``None`` if it has none."""
    return LANGUAGES.get(name)
