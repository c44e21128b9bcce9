"""Tokenizer, prompt, language names, output parsing and the repetition filter against the official outputs."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import CASES, TINY, get_case

from mlx_asr import tokenizer as tokenizer_module
from mlx_asr.config import num_audio_tokens
from mlx_asr.errors import LanguageError, ModelError
from mlx_asr.languages import LANGUAGES, language_code, resolve_language
from mlx_asr.prompt import build_prompt_ids, fix_repetitions, merge_languages, parse_asr_output, prompt_text
from mlx_asr.tokenizer import SLOW_FILES, QwenTokenizer, build_fast_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_dir(TINY)


def _expand(compact):
    ids = []
    for item in compact:
        if isinstance(item, str):
            token, count = item.split("x")
            ids += [int(token)] * int(count)
        else:
            ids.append(item)
    return ids


@pytest.mark.parametrize("tag", CASES)
def test_prompt_ids_equal_official(tokenizer, tag):
    case = get_case(tag)
    assert prompt_text(case.context, case.language) == case.meta["prompt_text"]
    ids = build_prompt_ids(tokenizer, case.meta["num_audio_tokens"], 151676, case.context, case.language)
    assert ids == _expand(case.meta["prompt_ids_compact"])
    assert num_audio_tokens(case.meta["mel_frames"]) == case.meta["num_audio_tokens"]


@pytest.mark.parametrize("tag", CASES)
def test_decode_and_parse_equal_official(tokenizer, tag):
    case = get_case(tag)
    raw = tokenizer.decode(case.generated_ids)
    assert raw == case.meta["decoded_raw"]
    assert tokenizer.decode(case.generated_ids, skip_special_tokens=False) == case.meta["decoded_with_special"]
    language, text = parse_asr_output(raw, case.language)
    assert (language, text) == (case.meta["parsed_language"], case.meta["parsed_text"])
    assert {"language": language, "text": text} == case.meta["transcribe_api"]


def _library_tokenizer_json(folder, **model_changes):
    """``folder`` with only a ``tokenizer.json`` (written by the ``tokenizers`` library) and the small files."""
    for name in ("tokenizer_config.json", "config.json"):
        shutil.copy(TINY / name, folder / name)
    build_fast_tokenizer(TINY).save(str(folder / "tokenizer.json"))
    if model_changes:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        data["model"].update(model_changes)
        (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ,.!?'\n\t-\r") + list("你好世界東京日本語한국어éüößç€…—“")
    pieces += ["<|im_start|>", "<asr_text>", "<|audio_pad|>", "<|im_end|>", " 's", "'ll", "e\u0301", "😀", "\u00a0",
               "  ", "\x00", "\x85", "\u2028", " language", " English", "system\n"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def test_encode_and_decode_equal_the_library(tokenizer):
    library = build_fast_tokenizer(TINY)
    for text in _random_texts(600):
        assert tokenizer.encode(text) == library.encode(text, add_special_tokens=False).ids, text
    rng = random.Random(1)
    for _ in range(600):
        ids = [rng.randrange(151_710) for _ in range(rng.randint(0, 12))] + rng.sample([151643, 151645, 151704], 2)
        rng.shuffle(ids)
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == library.decode(ids, skip_special_tokens=skip), ids


def test_tokenizer_json_alone_is_equivalent(tmp_path, tokenizer):
    alone = QwenTokenizer.from_dir(_library_tokenizer_json(tmp_path))
    for text in _random_texts(100, seed=2):
        assert alone.encode(text) == tokenizer.encode(text)
    assert alone.token_id("<asr_text>") == 151704


def test_slow_files_are_preferred(tmp_path, tokenizer):
    for name in SLOW_FILES:
        shutil.copy(TINY / name, tmp_path / name)
    (tmp_path / "tokenizer.json").write_text("not json")
    assert QwenTokenizer.from_dir(tmp_path).encode("hello world") == tokenizer.encode("hello world")


def test_ignore_merges_takes_whole_words_from_the_vocabulary(tmp_path, tokenizer):
    folder = _library_tokenizer_json(tmp_path, merges=[], ignore_merges=True)
    words = QwenTokenizer.from_dir(folder)
    assert words.encode(" hello world") == tokenizer.encode(" hello world")  # both words are vocabulary entries
    assert words.encode(" helloworld") == [tokenizer.token_id(c) for c in "Ġhelloworld"]  # no merges: bytes


def test_word_cache_is_bounded(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "WORD_CACHE_SIZE", 3)
    fresh = QwenTokenizer.from_dir(TINY)
    expected = [tokenizer.encode(f" word{i}") for i in range(10)]
    assert [fresh.encode(f" word{i}") for i in range(10)] == expected
    assert len(fresh._words) <= 3


def test_special_token_ids(tokenizer):
    assert tokenizer.encode("language Chinese<asr_text>") == [11528, 8453, 151704]
    assert tokenizer.token_id("<|audio_pad|>") == 151676
    assert tokenizer.decode([151645, 151704, 151643]) == "<asr_text>"


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ModelError, match="merges.txt"):
        QwenTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ModelError, match="tokenizer.json"):
        QwenTokenizer.from_dir(tmp_path)


def test_bad_added_token_table(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TINY / name, tmp_path / name)
    config = {"added_tokens_decoder": {"151650": {"content": "<|im_end|>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="cannot take id"):
        QwenTokenizer.from_dir(tmp_path)


def _slow_copy(folder, merges: str | None = None, flags: dict | None = None):
    for name in SLOW_FILES:
        shutil.copy(TINY / name, folder / name)
    if merges is not None:
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
    if flags:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["added_tokens_decoder"]["151704"].update(flags)
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_unsupported_added_token_flags(tmp_path):
    with pytest.raises(ModelError, match="sets lstrip"):
        QwenTokenizer.from_dir(_slow_copy(tmp_path, flags={"lstrip": True}))


def test_malformed_merges(tmp_path):
    with pytest.raises(ModelError, match="merges are not lines of two tokens"):
        QwenTokenizer.from_dir(_slow_copy(tmp_path, merges="#version: 0.2\nĠ Ġ\nabc\n"))


def test_merge_outside_the_vocabulary(tmp_path):
    tokenizer = QwenTokenizer.from_dir(_slow_copy(tmp_path, merges="#version: 0.2\r\nq j\r\n"))
    assert tokenizer.encode("xy") == [87, 88]
    with pytest.raises(ModelError, match="'qj' is not in the vocabulary"):
        tokenizer.encode("qj")


def test_tokenizer_json_of_another_model_type(tmp_path):
    folder = _library_tokenizer_json(tmp_path, type="WordPiece")
    with pytest.raises(ModelError, match="WordPiece model, not BPE"):
        QwenTokenizer.from_dir(folder)


@pytest.mark.parametrize(
    "given, expected",
    [("auto", None), (None, None), ("", None), ("en", "English"), ("ZH", "Chinese"), ("yue", "Cantonese"),
     ("english", "English"), ("  cHINese ", "Chinese"), ("fil", "Filipino")],
)
def test_resolve_language(given, expected):
    assert resolve_language(given) == expected


def test_unknown_language_lists_choices():
    with pytest.raises(LanguageError, match="Klingon.*English \\(en\\)"):
        resolve_language("Klingon")
    assert len(LANGUAGES) == 30 and language_code("Macedonian") == "mk" and language_code("Elvish") is None


def test_languages_follow_checkpoint_list():
    config = json.loads((TINY / "config.json").read_text())
    assert list(LANGUAGES) == config["support_languages"]


@pytest.mark.parametrize(
    "raw, forced, expected",
    [
        ("language English<asr_text> Hello there. ", None, ("English", "Hello there.")),
        ("language None<asr_text>", None, ("", "")),
        ("language None<asr_text>noise", None, ("", "noise")),
        ("just text", None, ("", "just text")),
        ("", None, ("", "")),
        ("language chinese\nextra<asr_text>你好", None, ("Chinese", "你好")),
        ("\nlanguage  english \n<asr_text>x", None, ("English", "x")),
        ("weird meta<asr_text>x", None, ("", "x")),
        ("Hello", "English", ("English", "Hello")),
    ],
)
def test_parse_asr_output(raw, forced, expected):
    assert parse_asr_output(raw, forced) == expected


def test_repetition_filter():
    assert fix_repetitions("a" * 21 + "b") == "ab"
    assert fix_repetitions("a" * 20 + "b") == "a" * 20 + "b"
    assert fix_repetitions("x" + "ab" * 25 + "yz") == "xabyz"
    assert fix_repetitions("(group" * 33 + " end") == "(group end"
    assert fix_repetitions("short") == "short"
    text = "no repeats in this sentence at all, just words that go on and on."
    assert fix_repetitions(text) == text


def test_merge_languages():
    assert merge_languages(["Chinese", "English", "English", "", "Chinese"]) == "Chinese,English,Chinese"
    assert merge_languages(["", ""]) == ""
