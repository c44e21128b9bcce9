"""The text normaliser used for WER/CER (and by ``--normalize``): documented, simple, language-neutral.

Steps: Unicode NFKC; lower case; drop the bracketed annotations ``[...]``/``(...)``/``<...>``;
replace every character that is not a letter, a digit, an apostrophe inside a word or white space
by a space; collapse white space. Chinese, Japanese, Korean and Cantonese are scored per character.
"""

from __future__ import annotations

import re
import unicodedata

CHARACTER_LANGUAGES = ("Chinese", "Japanese", "Korean", "Cantonese", "Thai", "zh", "ja", "ko", "yue", "th")
_BRACKETS = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>")
_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def normalize_text(text: str) -> str:
    """Normalise a transcript for scoring (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = _BRACKETS.sub(" ", text)
    kept = [c if c.isalnum() or c == "'" or c.isspace() else " " for c in text]
    text = _APOSTROPHE.sub(" ", "".join(kept))
    return " ".join(text.split())


def is_character_language(language: str | None) -> bool:
    """Whether error rates for ``language`` are counted per character (CER) rather than per word."""
    return bool(language) and any(lang in CHARACTER_LANGUAGES for lang in language.split(","))
