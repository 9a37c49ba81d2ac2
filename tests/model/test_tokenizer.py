"""Tests for model/tokenizer.py: the tiny character-level tokenizer and offline HF loading."""

import re
import string

import pytest

from leagues.model.tokenizer import TINY_VOCAB_SIZE, load_tokenizer, write_tiny_tokenizer


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    write_tiny_tokenizer(path)
    return path


@pytest.fixture
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  two leading spaces, two trailing  ",
        "line one\nline two\n\n\tindented 12345 + 67890 = 80235.",
        string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""),
        'def f(x):\n    return {"a": [x, ~x]}  # ok?',
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)  # character level, no bos/eos added
    assert tok.decode(ids) == text


def test_unknown_characters_map_to_unk(tok):
    assert tok.encode("aéb") == [tok.convert_tokens_to_ids("a"), tok.unk_token_id, tok.convert_tokens_to_ids("b")]


def test_special_tokens_are_single_ids(tok):
    ids = tok.encode("<|im_start|>x<|im_end|><|endoftext|><unk>")
    assert ids == [1, tok.convert_tokens_to_ids("x"), 2, 0, 3]


def test_special_token_ids(tok):
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.unk_token_id == 3


def test_vocab_size(tok):
    assert len(tok) == tok.vocab_size == TINY_VOCAB_SIZE == 101
    assert TINY_VOCAB_SIZE <= 128


def test_chat_template_is_chatml(tok):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    expected = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    expected_ids = [1, *tok.encode("user\n2+2?"), 2, *tok.encode("\n"), 1, *tok.encode("assistant\n4"), 2]
    assert list(ids) == [*expected_ids, *tok.encode("\n")]


def test_chat_template_generation_prompt(tok):
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_writes_are_deterministic(tmp_path):
    write_tiny_tokenizer(tmp_path / "a")
    write_tiny_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_missing_directory_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)


def test_missing_tokenizer_json_names_path(tiny_dir):
    (tiny_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tiny_dir))):
        load_tokenizer(tiny_dir)
