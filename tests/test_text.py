"""Tokenizer, prompt, language names, output parsing and the repetition filter against the official outputs."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import CASES, TINY, get_case

from mlx_asr.config import num_audio_tokens
from mlx_asr.errors import LanguageError, ModelError
from mlx_asr.languages import LANGUAGES, language_code, resolve_language
from mlx_asr.prompt import build_prompt_ids, fix_repetitions, merge_languages, parse_asr_output, prompt_text
from mlx_asr.tokenizer import QwenTokenizer


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


def test_tokenizer_json_is_preferred_and_equivalent(tmp_path, tokenizer):
    for f in TINY.iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, tmp_path / f.name)
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "vocab.json").unlink()
    fast = QwenTokenizer.from_dir(tmp_path)
    text = "language English<asr_text>Hello, wörld! 你好 iPhone's 123"
    assert fast.encode(text) == tokenizer.encode(text)
    assert fast.token_id("<asr_text>") == 151704


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
