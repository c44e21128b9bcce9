"""The Qwen2/Qwen3 byte-level BPE tokenizer.

The official model folder ships ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (the added
tokens with their ids); other folders may carry a ``tokenizer.json`` instead. The ``tokenizers`` library
takes 0.2-0.3 s to build its BPE model from these files (a tenth of a cold start), while Python's own
``json`` and dicts take about half of that; so :class:`QwenTokenizer` keeps the vocabulary and merge ranks in Python
dicts and runs the BPE merge loop itself, with a cache per word. Everything else comes from ``tokenizers``:
the NFC normaliser, the Qwen2 pre-tokenizer regex with the byte-level mapping, and the byte-level decoder.
Tests compare it with the library's tokenizer built from the same files (:func:`build_fast_tokenizer`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SLOW_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
WORD_CACHE_SIZE = 10_000
UNSUPPORTED_FLAGS = ("lstrip", "rstrip", "single_word")


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in the text before pre-tokenization (``<|im_start|>``, ``<asr_text>``...)."""

    content: str
    id: int
    special: bool

    @classmethod
    def from_spec(cls, token_id: int | str, spec: dict) -> AddedToken:
        """From a ``tokenizer_config.json`` / ``tokenizer.json`` entry; Qwen's tokens set none of the
        ``lstrip``, ``rstrip`` and ``single_word`` flags, and a table that does is refused."""
        flags = [flag for flag in UNSUPPORTED_FLAGS if spec.get(flag)]
        if flags:
            raise ValueError(f"added token {spec['content']!r} sets {', '.join(flags)} (not supported)")
        return cls(spec["content"], int(token_id), bool(spec.get("special", False)))


def qwen2_pre_tokenizer():
    """The Qwen2 pre-tokenizer of ``tokenizers``: split by :data:`QWEN2_PATTERN`, then map bytes to characters."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _check_added_ids(vocab: dict[str, int], added: Sequence[AddedToken], source: str) -> None:
    """Reject an added-token table whose ids differ from those ``tokenizers`` would assign.

    The library gives an added token its vocabulary id when the text is in the vocabulary, else the next
    free id after the vocabulary, in table order.
    """
    next_id = len(vocab)
    for token in sorted(added, key=lambda t: t.id):
        expected = vocab.get(token.content)
        if expected is None:
            expected, next_id = next_id, next_id + 1
        if token.id != expected:
            raise ModelError(f"{source}: added token {token.content!r} cannot take id {token.id}")


def _read_merges(path: Path) -> list[str]:
    """The merge lines of ``merges.txt`` ("left right"), in rank order, without the ``#version`` header."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip("\n")
    if text.startswith("#version"):
        text = text.partition("\n")[2]
    merges = text.split("\n") if text else []
    if text.count(" ") != len(merges):  # each line is "left right"; tokens hold no spaces
        raise ValueError("the merges are not lines of two tokens")
    return merges


def _load_slow_files(model_dir: Path) -> tuple[dict[str, int], list[str], list[AddedToken]]:
    vocab, merges, config = (model_dir / n for n in SLOW_FILES)
    missing = [p.name for p in (vocab, merges, config) if not p.is_file()]
    if missing:
        raise ModelError(f"{model_dir}: no tokenizer.json and missing {', '.join(missing)}")
    try:
        table = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        added = [AddedToken.from_spec(i, spec) for i, spec in table.items()]
        return json.loads(vocab.read_text(encoding="utf-8")), _read_merges(merges), added
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{model_dir}: unreadable tokenizer files ({exc})") from exc


def _load_tokenizer_json(path: Path) -> tuple[dict[str, int], list[str], list[AddedToken], bool]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"a {model['type']} model, not BPE")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        added = [AddedToken.from_spec(t["id"], t) for t in data["added_tokens"]]
        return model["vocab"], merges, added, bool(model.get("ignore_merges", False))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: unreadable tokenizer.json ({exc})") from exc


class QwenTokenizer:
    """Encode prompt text and decode generated ids, skipping special tokens but keeping ``<asr_text>``."""

    def __init__(
        self, vocab: dict[str, int], merges: Sequence[str], added: Sequence[AddedToken], ignore_merges: bool = False
    ) -> None:
        from tokenizers import decoders, normalizers

        self._vocab = vocab
        self._ranks = dict(zip(merges, range(len(merges)), strict=True))
        self._ignore_merges = ignore_merges
        self._added = {t.content: t for t in added}
        self._id_to_token = dict(zip(vocab.values(), vocab.keys(), strict=True))
        self._id_to_token.update((t.id, t.content) for t in added)
        self._special_ids = frozenset(t.id for t in added if t.special)
        by_length = sorted(self._added, key=len, reverse=True)  # leftmost-longest, as the library matches
        self._added_pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self._normalizer = normalizers.NFC()
        self._pre_tokenizer = qwen2_pre_tokenizer()
        self._decoder = decoders.ByteLevel()
        self._words: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> QwenTokenizer:
        """Read ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``, else ``tokenizer.json``.

        Raises :class:`ModelError` when the files are missing, unreadable or inconsistent.
        """
        model_dir = Path(model_dir)
        fast = model_dir / "tokenizer.json"
        if fast.is_file() and not all((model_dir / n).is_file() for n in SLOW_FILES):
            vocab, merges, added, ignore_merges = _load_tokenizer_json(fast)
            source = fast.name
        else:
            vocab, merges, added = _load_slow_files(model_dir)
            ignore_merges, source = False, "tokenizer_config.json"
        _check_added_ids(vocab, added, source)
        return cls(vocab, merges, added, ignore_merges)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; added tokens written in the text map to their ids. No BOS is added."""
        ids: list[int] = []
        for segment, token in self._split_added(text):
            if token is not None:
                ids.append(token.id)
                continue
            normalized = self._normalizer.normalize_str(segment)
            for word, _ in self._pre_tokenizer.pre_tokenize_str(normalized):
                ids += self._word_ids(word)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD, unknown ids are dropped."""
        skip = self._special_ids if skip_special_tokens else frozenset()
        tokens = [self._id_to_token[i] for i in ids if i in self._id_to_token and i not in skip]
        return self._decoder.decode(tokens)

    def token_id(self, token: str) -> int | None:
        """The id of an added token or vocabulary entry, ``None`` if there is none."""
        added = self._added.get(token)
        return added.id if added is not None else self._vocab.get(token)

    def _split_added(self, text: str) -> Iterator[tuple[str, AddedToken | None]]:
        """The text cut at the added tokens it contains: ``(segment, None)`` and ``(content, token)`` pieces."""
        start = 0
        if self._added_pattern is not None:
            for match in self._added_pattern.finditer(text):
                if match.start() > start:
                    yield text[start : match.start()], None
                yield match.group(), self._added[match.group()]
                start = match.end()
        if start < len(text):
            yield text[start:], None

    def _word_ids(self, word: str) -> list[int]:
        """BPE of one pre-tokenized word: merge the lowest-ranked adjacent pair until none is left."""
        cached = self._words.get(word)
        if cached is not None:
            return cached
        if self._ignore_merges and word in self._vocab:
            return [self._vocab[word]]
        symbols = list(word)
        while len(symbols) > 1:
            pairs = [f"{a} {b}" for a, b in zip(symbols, symbols[1:], strict=False)]
            best = min(pairs, key=lambda pair: self._ranks.get(pair, len(self._ranks)))
            if best not in self._ranks:
                break
            left, right = best.split(" ")
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        try:
            ids = [self._vocab[s] for s in symbols]
        except KeyError as exc:
            raise ModelError(f"tokenizer: {exc.args[0]!r} is not in the vocabulary") from exc
        if len(self._words) >= WORD_CACHE_SIZE:
            self._words.clear()
        self._words[word] = ids
        return ids


def build_fast_tokenizer(model_dir: str | Path):
    """The ``tokenizers`` library's tokenizer of a folder's slow-tokenizer files (``tokenizer.json`` source).

    The converter writes it as ``tokenizer.json`` for tools that read only that file.
    """
    from tokenizers import AddedToken as LibraryAddedToken
    from tokenizers import Tokenizer, decoders, models, normalizers

    model_dir = Path(model_dir)
    vocab, merges, added = _load_slow_files(model_dir)
    _check_added_ids(vocab, added, "tokenizer_config.json")
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    for token in sorted(added, key=lambda t: t.id):
        entry = LibraryAddedToken(token.content, normalized=False, special=token.special)
        tok.add_special_tokens([entry]) if token.special else tok.add_tokens([entry])
    return tok
