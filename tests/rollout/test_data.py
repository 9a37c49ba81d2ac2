"""Prompt datasets: JSONL and Parquet loading, formatting with the tiny tokenizer's ChatML template, row
validation with file:line errors, long-prompt handling, and the resumable prompt iterator."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leagues.model import load_tokenizer, resolve_model_path
from leagues.rollout.data import DataConfig, PromptIterator, format_prompt, load_prompts, prompts_from_rows


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path("tiny-moe"))


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def chatml(*turns):
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + "<|im_start|>assistant\n"


def test_jsonl_with_custom_keys_metadata_and_system_prompt(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"q": "hi", "ans": 3, "src": "a", "extra": 1}, "", {"q": "yo", "src": "b"}],
    )
    cfg = DataConfig(path=str(path), prompt_key="q", label_key="ans", metadata_keys=["src"], system_prompt="S")
    data = load_prompts(cfg, tok)
    assert len(data) == 2 and data.num_skipped == 0
    first, second = data
    assert first.text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert first.prompt_ids == tok.encode(first.text, add_special_tokens=False)
    assert first.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # special tokens are single ids
    assert (first.index, first.label, first.metadata, first.source) == (0, 3, {"src": "a"}, f"{path}:1")
    assert (second.index, second.label, second.metadata, second.source) == (1, None, {"src": "b"}, f"{path}:3")


def test_message_prompts_keep_their_own_system_message(tmp_path, tok):
    messages = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": messages}, {"prompt": [{"role": "user", "content": "r"}]}])
    data = load_prompts(DataConfig(path=str(path), system_prompt="S"), tok)
    assert data[0].text == chatml(("system", "mine"), ("user", "q"))
    assert data[1].text == chatml(("system", "S"), ("user", "r"))


def test_plain_text_without_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+3="}])
    data = load_prompts(DataConfig(path=str(path), system_prompt="Add.", chat_template=False), tok)
    assert data[0].text == "Add.\n2+3=" and tok.decode(data[0].prompt_ids) == "Add.\n2+3="
    assert format_prompt(tok, "x", None, chat_template=False) == "x"
    assert format_prompt(tok, "x", None, chat_template=True) == chatml(("user", "x"))
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match=rf"{path}:1: field 'prompt': .*needs a chat template"):
        load_prompts(DataConfig(path=str(path), chat_template=False), tok)


def test_parquet_with_custom_keys(tmp_path, tok):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"x": "a", "y": 1.5, "k": "m"}, {"x": "b", "y": 2.0, "k": "n"}]), path)
    cfg = DataConfig(path=str(path), prompt_key="x", label_key="y", metadata_keys=["k"], chat_template=False)
    data = load_prompts(cfg, tok)
    assert [(p.text, p.label, p.metadata, p.source) for p in data] == [
        ("a", 1.5, {"k": "m"}, f"{path}: row 0"),
        ("b", 2.0, {"k": "n"}, f"{path}: row 1"),
    ]
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": ""}]), bad := tmp_path / "bad.data")
    with pytest.raises(ValueError, match=rf"{bad}: row 1: field 'prompt': empty string"):
        load_prompts(DataConfig(path=str(bad), format="parquet"), tok)
    data = load_prompts(DataConfig(path=str(bad), format="parquet", skip_bad_rows=True), tok)
    assert len(data) == 1 and data.num_skipped == 1


BAD_LINES = {
    "{not json": r"invalid JSON",
    "[1, 2]": r"row must be a JSON object, got list",
    '{"label": 1}': r"field 'prompt': missing",
    '{"prompt": ""}': r"field 'prompt': empty string",
    '{"prompt": 7}': r"field 'prompt': expected a string or a list of messages, got int",
    '{"prompt": []}': r"field 'prompt': empty list of messages",
    '{"prompt": [{"role": "user"}]}': r"field 'prompt': message 0 must be an object",
    '{"prompt": "ok"}': r"field 'src': missing \(listed in metadata_keys\)",
}


@pytest.mark.parametrize("line", list(BAD_LINES))
def test_malformed_rows_name_file_line_and_field(tmp_path, tok, line):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "src": 1}, line])
    with pytest.raises(ValueError, match=rf"^{path}:2: {BAD_LINES[line]}"):
        load_prompts(DataConfig(path=str(path), metadata_keys=["src"]), tok)


def test_skip_bad_rows_counts_and_keeps_reasons(tmp_path, tok):
    lines = [{"prompt": "a"}, *BAD_LINES, {"prompt": "b"}]  # the last bad line lacks nothing without metadata_keys
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    data = load_prompts(DataConfig(path=str(path), skip_bad_rows=True, chat_template=False), tok)
    assert [p.text for p in data] == ["a", "ok", "b"] and [p.index for p in data] == [0, 1, 2]
    assert data.num_skipped == len(BAD_LINES) - 1
    assert data.skipped_reasons[0].startswith(f"{path}:2: invalid JSON")


def test_missing_file_unknown_suffix_and_empty_dataset(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(DataConfig(path=str(tmp_path / "nope.jsonl")), tok)
    (tmp_path / "p.txt").write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_prompts(DataConfig(path=str(tmp_path / "p.txt")), tok)
    assert len(load_prompts(DataConfig(path=str(tmp_path / "p.txt"), format="jsonl"), tok)) == 1
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": 1}', ""])
    with pytest.raises(ValueError, match="no prompts left"):
        load_prompts(DataConfig(path=str(path), skip_bad_rows=True), tok)
    with pytest.raises(ValueError, match="format"):
        DataConfig(format="csv")


def test_long_prompts_raise_or_are_filtered(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc"}, {"prompt": "abcdefgh"}, {"prompt": "abcde"}])
    cfg = DataConfig(path=str(path), chat_template=False, max_prompt_tokens=5)
    with pytest.raises(ValueError, match=rf"{path}:2: prompt has 8 tokens, more than max_prompt_tokens=5"):
        load_prompts(cfg, tok)
    cfg.filter_long_prompts = True
    data = load_prompts(cfg, tok)
    assert [p.text for p in data] == ["abc", "abcde"] and data.num_filtered == 1


def dataset_of(tok, n):
    rows = [(f"row {i}", {"prompt": f"p{i}"}) for i in range(n)]
    return prompts_from_rows(rows, DataConfig(chat_template=False), tok)


def texts(batch):
    return [p.text for p in batch]


def test_iterator_walks_epochs_in_order_without_shuffle(tok):
    it = PromptIterator(dataset_of(tok, 5), shuffle=False)
    assert texts(it.next_batch(3)) == ["p0", "p1", "p2"] and it.epoch == 0
    assert texts(it.next_batch(3)) == ["p3", "p4", "p0"] and it.epoch == 1  # a batch crosses the epoch boundary
    assert texts(it.next_batch(4)) == ["p1", "p2", "p3", "p4"] and it.epoch == 2
    with pytest.raises(ValueError, match="batch size"):
        it.next_batch(0)


def test_iterator_shuffles_each_epoch_deterministically(tok):
    data = dataset_of(tok, 10)
    epochs = [texts(PromptIterator(data, seed=1).next_batch(10)) for _ in range(2)]
    assert epochs[0] == epochs[1] and sorted(epochs[0]) == sorted(texts(data))  # same seed, same permutation
    it = PromptIterator(data, seed=1)
    first, second = texts(it.next_batch(10)), texts(it.next_batch(10))
    assert first == epochs[0] and sorted(second) == sorted(first) and second != first
    assert texts(PromptIterator(data, seed=2).next_batch(10)) != first


def test_iterator_resume_gives_the_same_batches(tok):
    data = dataset_of(tok, 7)
    reference = PromptIterator(data, seed=3)
    expected = [texts(reference.next_batch(4)) for _ in range(6)]
    it = PromptIterator(data, seed=3)
    [it.next_batch(4) for _ in range(2)]
    state = json.loads(json.dumps(it.state_dict()))  # plain ints survive a JSON round trip
    assert all(type(v) is int for v in state.values())
    resumed = PromptIterator(data, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and [texts(resumed.next_batch(4)) for _ in range(4)] == expected[2:]
    with pytest.raises(ValueError, match="num_prompts"):
        PromptIterator(dataset_of(tok, 6), seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptIterator(data, seed=4).load_state_dict(state)
