"""The Qwen2/Qwen3 byte-level BPE tokenizer, from ``tokenizer.json`` or from the slow-tokenizer files.

The official model folder ships ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (added
tokens with their ids) and no ``tokenizer.json``; we build the same fast tokenizer the ``tokenizers``
library would, with the Qwen2 pre-tokenizer regex and NFC normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import ModelError

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _build_from_slow_files(model_dir: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges, config = (model_dir / n for n in ("vocab.json", "merges.txt", "tokenizer_config.json"))
    missing = [p.name for p in (vocab, merges, config) if not p.is_file()]
    if missing:
        raise ModelError(f"{model_dir}: no tokenizer.json and missing {', '.join(missing)}")
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges), unk_token=None, fuse_unk=False, byte_fallback=False)
        added = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
    except Exception as exc:  # tokenizers raises plain Exception subclasses on bad files
        raise ModelError(f"{model_dir}: unreadable tokenizer files ({exc})") from exc
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for token_id, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", False),
        )
        tok.add_special_tokens([token]) if token.special else tok.add_tokens([token])
        if tok.token_to_id(spec["content"]) != int(token_id):
            raise ModelError(f"{config.name}: added token {spec['content']!r} cannot take id {token_id}")
    return tok


class QwenTokenizer:
    """Encode prompt text and decode generated ids, skipping special tokens but keeping ``<asr_text>``."""

    def __init__(self, backend) -> None:
        self._tok = backend

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> QwenTokenizer:
        """Load ``tokenizer.json`` if the folder has one, else build it from the slow-tokenizer files."""
        model_dir = Path(model_dir)
        fast = model_dir / "tokenizer.json"
        if fast.is_file():
            from tokenizers import Tokenizer

            try:
                return cls(Tokenizer.from_file(str(fast)))
            except Exception as exc:
                raise ModelError(f"{fast}: unreadable tokenizer.json ({exc})") from exc
        return cls(_build_from_slow_files(model_dir))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text map to their ids. No BOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str | Path) -> None:
        """Write a ``tokenizer.json`` (used by the converter)."""
        self._tok.save(str(path))
