"""`TextStream`, the streamed text of a sample: its incremental decoding gives the whole decode's text, on a
byte-level BPE tokenizer whose tokens split UTF-8 characters and merge across token boundaries."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from leagues.serve.reply import TextStream

CORPUS = ["héllo wörld, ça va? 中文字符 and emoji 🙂🚀", "the quick brown fox", "naïve café déjà vu ☃"] * 20


@pytest.fixture(scope="module", params=[False, True], ids=["backend-decode", "clean-up-spaces"])
def tokenizer(request):
    """Without clean-up of tokenization spaces the stream decodes with the backend itself; with it, through the
    wrapper (which cleans up): both must give the wrapper's whole decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=request.param)


def stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[TextStream, list[str]]:
    text = TextStream(tokenizer, stop)
    deltas = [text.add(t, -0.5) for t in ids]
    return text, deltas


def test_the_deltas_concatenate_to_the_whole_decode(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    checked = 0
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        text, deltas = stream(tokenizer, ids, [])
        assert "".join(deltas) == text.text
        assert whole.startswith(text.text)  # never ahead of what the whole decode says
        if not whole.endswith("\ufffd"):  # a broken character at the end waits for the final text
            assert text.text == whole
            checked += 1
        assert text.ids == ids and text.logprobs == [-0.5] * len(ids)
    assert checked > 50


def test_bursts_of_tokens_stream_what_token_by_token_streams(tokenizer):
    """A stream that falls behind takes its tokens in bursts, decoded at once: its text is the token-by-token
    stream's at every burst's end."""
    rng = random.Random(1)
    vocab = len(tokenizer)
    for _ in range(100):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        one, _ = stream(tokenizer, [], [])
        bursts, deltas, end = TextStream(tokenizer, []), [], 0
        while end < len(ids):
            start, end = end, min(len(ids), end + rng.randrange(1, 6))
            deltas.append(bursts.extend(ids[start:end], [-0.5] * (end - start)))
            for t in ids[start:end]:
                one.add(t, -0.5)
            assert bursts.text == one.text
        assert "".join(deltas) == bursts.text and bursts.ids == ids and bursts.logprobs == [-0.5] * len(ids)


def test_text_of_real_words_streams_whole_and_multibyte_characters_wait_for_their_last_byte(tokenizer):
    sentence = "ça va? 中文字符 🙂🚀 déjà"
    ids = tokenizer.encode(sentence)
    assert len(ids) > 6
    text, deltas = stream(tokenizer, ids, [])
    assert text.text == sentence
    assert all("\ufffd" not in d for d in deltas)
    byte_split = [i for i in range(len(ids)) if tokenizer.decode(ids[: i + 1]).endswith("\ufffd")]
    assert byte_split, "the corpus must split some character across tokens"
    for i in byte_split:  # the text shown after such a token does not reach into the broken character
        partial = TextStream(tokenizer, [])
        for t in ids[: i + 1]:
            partial.add(t, 0.0)
        assert sentence.startswith(partial.text) and "\ufffd" not in partial.text


def test_stop_strings_are_held_back_until_finish(tokenizer):
    sentence = "the quick brown fox"
    ids = tokenizer.encode(sentence)
    text, deltas = stream(tokenizer, ids, ["STOP!"])
    assert text.text == sentence[: len(sentence) - len("STOP!")]
    assert text.finish("the quick brown") == "n"  # the engine cut the final text before the stop it matched
    assert text.text == "the quick brown"
    text, _ = stream(tokenizer, ids, ["xx"])
    assert text.finish(sentence) == sentence[-2:]


def test_no_tokenizer_streams_no_text():
    text = TextStream(None, [])
    assert text.add(5, -1.0) == "" and text.text == "" and text.ids == [5]


def test_generate_stream_chunks_are_the_json_of_the_whole_dict(tokenizer):
    """`/generate`'s running chunks grow their ids' JSON token by token: the bytes must be json.dumps of the dict."""
    import json
    from types import SimpleNamespace

    from leagues.serve.api_sglang import _partial
    from leagues.serve.reply import sse

    rng = random.Random(2)
    batch = SimpleNamespace(rids=['gen-"q"\\', "gen-b"], params=SimpleNamespace(n=2))
    for return_logprob in (False, True):
        req = SimpleNamespace(return_logprob=return_logprob)
        text = TextStream(tokenizer, [])
        for k in range(60):
            text.add(rng.randrange(len(tokenizer)), -0.25 * k)
            if k % 3:  # a burst of several tokens in one chunk, as when the stream is behind
                continue
            index = k % 4
            got = _partial(req, batch, index, text)
            meta = {"id": batch.rids[index // 2], "finish_reason": None, "completion_tokens": len(text.ids)}
            if return_logprob:
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(text.logprobs, text.ids, strict=True)]
            assert got == sse({"text": text.text, "output_ids": text.ids, "meta_info": meta, "index": index})
            assert json.loads(got[len("data: ") :])["output_ids"] == text.ids
