"""Tokenizer and chat-template loading, plus the tiny tokenizer of the built-in test model.

Where it sits: `model/` owns everything that turns an HF checkpoint directory into something runnable,
and the tokenizer is part of that checkpoint. `rollout/` formats prompts with the tokenizer loaded here;
the engine and the trainer only ever see token ids.

Decisions:
- Loading goes through `transformers.AutoTokenizer` with `local_files_only=True`: the chat template,
  special tokens and added tokens then behave exactly as users know them from HF, and nothing is
  downloaded. A missing directory or `tokenizer.json` fails early, naming the path, instead of
  surfacing as a hub lookup error.
- The tiny tokenizer is character-level: a BPE model with no merges over printable ASCII plus `\\n` and
  `\\t`, so every character is one token, anything else is `<unk>`, and a `Fuse` decoder makes
  encode -> decode round-trip printable ASCII exactly (no added or dropped spaces).
- Its special tokens follow Qwen's ChatML (`<|endoftext|>` pads, `<|im_end|>` ends a turn and is the eos),
  so chat-template code paths are exercised by CPU tests the same way as with a real Qwen checkpoint.
- The files are written by hand from fixed data (no timestamps, stable key order), so two writes are
  byte-identical and a checked-in tiny checkpoint never churns.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, UNK_TOKEN)
# Printable ASCII from space (0x20) to `~` (0x7e), then the two whitespace controls text actually uses.
TINY_CHARS = tuple(chr(c) for c in range(0x20, 0x7F)) + ("\n", "\t")
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(TINY_CHARS)

# Qwen-style ChatML: each turn is `<|im_start|>{role}\n{content}<|im_end|>\n`.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer and chat template of the HF checkpoint directory `path`, offline."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path} (only fast tokenizers are supported)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def write_tiny_tokenizer(path: str | Path) -> None:
    """Write the character-level tokenizer of the tiny test model into `path` in HF format."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_build_tiny_tokenizer().to_str(pretty=True) + "\n")
    _write_json(path / "tokenizer_config.json", _tiny_tokenizer_config())
    _write_json(path / "special_tokens_map.json", _special_tokens_map())


def _build_tiny_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + TINY_CHARS)}
    assert len(vocab) == TINY_VOCAB_SIZE <= 128, "tiny vocab must fit the tiny model's embedding"
    # No merges: BPE then splits every word into single characters; unknown characters become <unk>.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tokenizer.decoder = decoders.Fuse()
    # Special tokens are matched in raw text before the model runs, so each is one id.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _tiny_tokenizer_config() -> dict:
    added_tokens = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens,
        **_special_tokens_map(),
        # HF's default cleanup would eat spaces before punctuation and break the exact round trip.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHATML_TEMPLATE,
    }


def _special_tokens_map() -> dict:
    return {"eos_token": IM_END_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
