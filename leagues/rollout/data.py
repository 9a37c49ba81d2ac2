"""Prompt datasets: reading JSONL or Parquet rows, formatting and tokenizing prompts, and a resumable iterator.

Where it sits: the first box of the RL loop. `load_prompts(cfg, tokenizer)` turns a data file into a
`PromptDataset` of `Prompt`s (token ids, formatted text, label, metadata); the loop draws batches from a
`PromptIterator`, hands the prompts to the generate functions, and the label and metadata travel on to
the reward. Built-in tasks (`tasks.py`) build the same records from generated rows (`prompts_from_rows`),
so a task and `--data file.jsonl` share one validation and formatting path.

Decisions:
- Every row is validated and tokenized at load time, so a bad row fails before any GPU time is spent, with
  its place in the file: `FILE:LINE: field 'prompt': ...` for JSONL, `FILE: row N: field ...` for Parquet
  (N counts from 0). With `skip_bad_rows` such rows are dropped instead; the count and the first few
  reasons are kept on the dataset. Blank JSONL lines are not rows.
- A prompt is a string or a list of chat messages. With the chat template (when the tokenizer has one and
  `chat_template` is on), a string becomes one user message; `system_prompt` is put in front unless the
  messages already start with a system message (the row's own one wins). Without the template, the system
  prompt is prepended as plain text and a newline, and a list of messages is a bad row: there is no
  faithful way to render roles without a template.
- `label_key` and `metadata_keys` columns are optional per row for the label (missing: None) and required
  for metadata keys (missing: a bad row), because a reward that reads a metadata key expects it.
- Prompt ids are `tokenizer.encode(text, add_special_tokens=False)`: the chat template already wrote the
  special tokens, and a BOS added twice would shift every position.
- Too-long prompts (`max_prompt_tokens`) raise naming the row, or are dropped and counted with
  `filter_long_prompts`; an empty dataset after all this is an error.
- The iterator's order for epoch e is a permutation seeded by (seed, e), so its whole state is
  (epoch, position) and a resumed run draws exactly the batches an uninterrupted one would. The seed is a
  string, which `random.Random` hashes with SHA-512: the order does not depend on PYTHONHASHSEED.
"""

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

_FORMATS = ("auto", "jsonl", "parquet")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonlines": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_MAX_KEPT_REASONS = 10


@dataclass(kw_only=True, slots=True)
class DataConfig:
    SHORTHAND: ClassVar[str] = "path"
    """`--data FILE` sets `data.path`."""

    path: str = ""
    """JSONL or Parquet file of prompt rows."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """jsonl | parquet | auto (by suffix: .jsonl/.ndjson/.jsonlines, .parquet/.pq)."""
    prompt_key: str = "prompt"
    """Column of the prompt: a non-empty string or a list of {"role", "content"} messages."""
    label_key: str = "label"
    """Column of the label handed to the reward (any JSON value; missing: None)."""
    metadata_keys: list[str] = field(default_factory=list)
    """Extra columns copied into each prompt's metadata (each must be present in every row); empty: none."""
    system_prompt: str | None = None
    """System message put before every prompt (plain text plus a newline when no chat template is used)."""
    chat_template: bool = True
    """Format prompts with the tokenizer's chat template, when it has one."""
    shuffle: bool = True
    """Draw prompts in a seeded random order, a new permutation every epoch."""
    seed: int = 0
    """Seed of the prompt order."""
    skip_bad_rows: bool = False
    """Drop malformed rows (counted on the dataset) instead of raising."""
    max_prompt_tokens: int | None = None
    """Longest allowed prompt in tokens; None: no limit."""
    filter_long_prompts: bool = False
    """Drop (and count) prompts over max_prompt_tokens instead of raising."""

    def __post_init__(self) -> None:
        if self.format not in _FORMATS:
            raise ValueError(f"DataConfig.format: expected one of {', '.join(_FORMATS)}, got {self.format!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"DataConfig.max_prompt_tokens: must be >= 1, got {self.max_prompt_tokens}")


@dataclass(kw_only=True, slots=True)
class Prompt:
    """One prompt, ready for generation."""

    index: int
    """Position in the dataset (0..len-1), after skipped and filtered rows are gone."""
    prompt_ids: list[int]
    text: str
    """The formatted prompt (chat template and system prompt applied)."""
    label: Any = None
    """The row's label, any JSON value, for the reward."""
    metadata: dict = field(default_factory=dict)
    """The row's `metadata_keys` columns."""
    source: str = ""
    """Where the row came from, `FILE:LINE` or `FILE: row N`, for error messages downstream."""


class BadRow(ValueError):
    """A row that cannot become a prompt; the message names the field."""


def format_prompt(tokenizer: Any, prompt: str | list[dict], system_prompt: str | None, chat_template: bool) -> str:
    """The prompt text the model sees: the chat template applied (when used), or plain text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system_prompt is not None and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise BadRow("a list of chat messages needs a chat template (the tokenizer has none, or it is off)")
    return prompt if system_prompt is None else f"{system_prompt}\n{prompt}"


def check_prompt_field(value: Any) -> str | list[dict]:
    """`value` if it is a valid prompt (non-empty string, or non-empty list of role/content messages)."""
    if isinstance(value, str):
        if not value:
            raise BadRow("empty string")
        return value
    if not isinstance(value, list):
        raise BadRow(f"expected a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise BadRow("empty list of messages")
    for i, message in enumerate(value):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message
        if not ok or not isinstance(message["content"], str):
            raise BadRow(f"message {i} must be an object with string 'role' and 'content', got {message!r:.80}")
    return value


class PromptDataset:
    """The prompts of one data file (or of generated rows), with what was dropped on the way."""

    def __init__(self, prompts: list[Prompt], source: str, skipped: list[str], num_filtered: int) -> None:
        if not prompts:
            raise ValueError(f"{source}: no prompts left (skipped {len(skipped)}, filtered {num_filtered})")
        self.prompts = prompts
        self.source = source
        self.num_skipped = len(skipped)
        """Malformed rows dropped because of `skip_bad_rows`."""
        self.skipped_reasons = skipped[:_MAX_KEPT_REASONS]
        """The first few reasons rows were skipped, each naming its row."""
        self.num_filtered = num_filtered
        """Prompts dropped for being longer than `max_prompt_tokens`."""

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)


def load_prompts(cfg: DataConfig, tokenizer: Any) -> PromptDataset:
    """Read, validate, format and tokenize every row of `cfg.path`."""
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt data file not found: {cfg.path!r}")
    reader = _READERS[_resolve_format(cfg)]
    return prompts_from_rows(reader(path), cfg, tokenizer, source=str(path))


def prompts_from_rows(
    rows: Iterable[tuple[str, Any]], cfg: DataConfig, tokenizer: Any, source: str = "<rows>"
) -> PromptDataset:
    """A dataset from `(where, row)` pairs; `where` prefixes errors (`FILE:LINE`). A row that is a
    `BadRow` exception (a reader's parse error) is treated like any other bad row."""
    prompts, skipped, num_filtered = [], [], 0
    for where, row in rows:
        try:
            prompt = _make_prompt(row, cfg, tokenizer, index=len(prompts), where=where)
        except BadRow as e:
            reason = f"{where}: {e}"
            if not cfg.skip_bad_rows:
                raise ValueError(reason) from None
            skipped.append(reason)
            continue
        if cfg.max_prompt_tokens is not None and len(prompt.prompt_ids) > cfg.max_prompt_tokens:
            if not cfg.filter_long_prompts:
                raise ValueError(
                    f"{where}: prompt has {len(prompt.prompt_ids)} tokens, more than max_prompt_tokens="
                    f"{cfg.max_prompt_tokens} (set filter_long_prompts to drop such rows)"
                )
            num_filtered += 1
            continue
        prompts.append(prompt)
    return PromptDataset(prompts, source, skipped, num_filtered)


def _make_prompt(row: Any, cfg: DataConfig, tokenizer: Any, index: int, where: str) -> Prompt:
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"row must be a JSON object, got {type(row).__name__}")
    if cfg.prompt_key not in row:
        raise BadRow(f"field {cfg.prompt_key!r}: missing")
    try:
        prompt = check_prompt_field(row[cfg.prompt_key])
        text = format_prompt(tokenizer, prompt, cfg.system_prompt, cfg.chat_template)
    except BadRow as e:
        raise BadRow(f"field {cfg.prompt_key!r}: {e}") from None
    missing = [key for key in cfg.metadata_keys if key not in row]
    if missing:
        raise BadRow(f"field {missing[0]!r}: missing (listed in metadata_keys)")
    return Prompt(
        index=index,
        prompt_ids=tokenizer.encode(text, add_special_tokens=False),
        text=text,
        label=row.get(cfg.label_key),
        metadata={key: row[key] for key in cfg.metadata_keys},
        source=where,
    )


def _resolve_format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    suffix = Path(cfg.path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"{cfg.path}: cannot tell the format from suffix {suffix!r}; set format to jsonl or parquet")
    return _SUFFIX_FORMATS[suffix]


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = BadRow(f"invalid JSON: {e.msg} (column {e.colno})")
            yield f"{path}:{lineno}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # imported here: JSONL users don't pay for pyarrow

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for unreadable files
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet}


class PromptIterator:
    """Batches of prompts, epoch after epoch, each epoch in its own seeded order; resumable."""

    def __init__(self, dataset: PromptDataset, seed: int = 0, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    @property
    def epoch(self) -> int:
        """Full passes over the dataset completed so far."""
        return self._epoch

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts; a batch may run over into the next epoch (and its new order)."""
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        batch = []
        for _ in range(n):
            batch.append(self.dataset[self._order[self._position]])
            self._position += 1
            if self._position == len(self._order):
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._permutation(self._epoch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed, "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off; the dataset and seed must be the ones it was saved with."""
        expected = {"seed": self.seed, "num_prompts": len(self.dataset)}
        for key, value in expected.items():
            if state.get(key, value) != value:
                raise ValueError(f"prompt iterator state has {key}={state[key]}, but this iterator has {value}")
        if not 0 <= state["position"] < len(self.dataset) or state["epoch"] < 0:
            raise ValueError(f"prompt iterator state out of range: {state}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self._epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(f"leagues-prompts:{self.seed}:{epoch}").shuffle(order)
        return order
