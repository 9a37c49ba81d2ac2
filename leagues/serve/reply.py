"""The assistant reply of one chat choice, read from its text: reasoning, content and tool calls, whole or as
OpenAI stream deltas while the text grows.

    reply = Reply(tools=True, thinking=False, prefill="", call_id=lambda i: f"call_{i}")
    deltas = reply.deltas(text_so_far)                 # streamed: what is new and can no longer change
    message, finish, deltas = reply.finish(text, "stop")  # the whole message, and the deltas that complete it

Where it sits: the OpenAI chat route (`api_openai.py`) and agent sessions (`sessions.py`) answer with it, so a
streamed answer and an unstreamed one are two views of the same sampled text. It only reads text: the sampled
tokens are never edited (sessions record them as sampled).

Decisions:
- Reasoning (Qwen3's `<think>...</think>`): when the reply opens with `<think>`, or the prompt left a think block
  open (`thinking`), the text up to `</think>` is `reasoning_content` (stripped) and the content is what follows
  (leading whitespace dropped); a reply cut off inside its think block is all reasoning. Other replies are content.
- Tool calls (Qwen/Hermes `<tool_call>` blocks, `leagues.agent.tool_calls`): with tools, the content is the text
  before the first call, stripped (all of it when a block cannot be read: the readable calls still come back), and
  the finish reason is `tool_calls` when the model stopped by itself.
- `prefill`: text the server wrote after the generation prompt for the model (a forced call's opening,
  `call_prefill`). It is read as the start of the reply, though the model did not sample it.
- `TextStream` turns a choice's sampled tokens into its text as they come (it serves `/generate` streams too).
- Streaming sends only what no later token can change: text that might be the start of `</think>` or `<tool_call>`
  and trailing whitespace wait; a call goes out whole (index, id, name, arguments) once its block closes. The
  final deltas complete the message, so a choice's deltas concatenate to the unstreamed message.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from leagues.agent.tool_calls import ToolCall, parse_tool_calls

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN = "<tool_call>"
PARSER = "hermes"
"""The model's tool-call format: Qwen / Hermes blocks (`leagues.agent.tool_calls`)."""


def opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves a think block open (thinking templates end the generation prompt so)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def call_prefill(tool_choice, tool_names: list[str], thinking: bool) -> str:
    """The text that makes the model's reply start with a call, for a forced `tool_choice` ("required", or
    `{"type": "function", "function": {"name": ...}}`); "" for none and auto. It ends before the arguments' space,
    so the model samples the tokens it would write there itself. An open think block is closed first."""
    if tool_choice in (None, "none", "auto"):
        return ""
    if not tool_names:
        raise ValueError("tool_choice: a forced call needs tools")
    opening = THINK_CLOSE + "\n\n" if thinking else ""
    if tool_choice == "required":
        return opening + CALL_OPEN + "\n"
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type") != "function":
        raise ValueError(f'tool_choice: none, auto, required or {{"type": "function", ...}}, got {tool_choice!r}')
    name = function.get("name")
    if name not in tool_names:
        raise ValueError(f"tool_choice: no tool named {name!r} among the request's tools")
    return opening + f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments":'


def _held(text: str, marker: str) -> str:
    """`text` without a tail that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


@dataclass(slots=True)
class Reply:
    tools: bool = False
    """Read `<tool_call>` blocks into `tool_calls` (the request has tools and tool_choice is not none)."""
    thinking: bool = False
    """The prompt left a think block open: the reply starts in its reasoning."""
    prefill: str = ""
    """Text the server wrote for the model after the generation prompt (not sampled)."""
    call_id: Callable[[int], str] = field(default=lambda index: f"call_{index}")
    """The id of the call in the reply's block `index`."""
    sent: dict[str, str] = field(default_factory=lambda: {"reasoning_content": "", "content": ""})
    num_sent_calls: int = 0

    def _split(self, text: str) -> tuple[str | None, str, bool]:
        """(the reasoning or None, the text after it, whether the think block is closed)."""
        text = self.prefill + text
        opened = text.startswith(THINK_OPEN)
        if not (self.thinking or opened):
            return None, text, True
        body = text[len(THINK_OPEN) :] if opened else text
        end = body.find(THINK_CLOSE)
        if end < 0:
            return body, "", False
        return body[:end], body[end + len(THINK_CLOSE) :], True

    def _content(self, after: str, reasoning: str | None) -> str:
        return after.lstrip() if reasoning is not None or self.tools else after

    def message(self, text: str, finish: str) -> tuple[dict, str]:
        """The assistant message of the whole text, and the finish reason (`tool_calls` for a stop with calls)."""
        reasoning, after, _ = self._split(text)
        content = self._content(after, reasoning)
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning.strip() or None
        calls, errors = parse_tool_calls(content, PARSER) if self.tools else ([], [])
        if calls:
            kept = content if errors else content[: content.find(CALL_OPEN)]
            message["content"] = kept.rstrip() or None
            message["tool_calls"] = [self._call(c) for c in calls]
            finish = "tool_calls" if finish == "stop" else finish
        return message, finish

    def _call(self, call: ToolCall) -> dict:
        function = {"name": call.name, "arguments": json.dumps(call.arguments)}
        return {"id": self.call_id(call.index), "type": "function", "function": function}

    def deltas(self, text: str) -> list[dict]:
        """The deltas the text so far adds to what was sent, holding back what a later token could change."""
        full = self.prefill + text
        if not self.thinking and THINK_OPEN.startswith(full):  # it may yet open a think block
            return []
        reasoning, after, closed = self._split(text)
        if not closed:
            return self._text_deltas(_held(reasoning, THINK_CLOSE).strip(), "")
        content = self._content(after, reasoning)
        if not self.tools:
            return self._text_deltas((reasoning or "").strip(), content)
        at = content.find(CALL_OPEN)
        before = content[:at] if at >= 0 else _held(content, CALL_OPEN)
        out = self._text_deltas((reasoning or "").strip(), before.rstrip())
        calls, _ = parse_tool_calls(content, PARSER) if at >= 0 else ([], [])
        return out + self._call_deltas([self._call(c) for c in calls])

    def finish(self, text: str, finish: str) -> tuple[dict, str, list[dict]]:
        """The whole message, its finish reason, and the deltas that complete what was streamed."""
        message, finish = self.message(text, finish)
        out = self._text_deltas(message.get("reasoning_content") or "", message["content"] or "")
        return message, finish, out + self._call_deltas(message.get("tool_calls", []))

    def _text_deltas(self, reasoning: str, content: str) -> list[dict]:
        out = []
        for key, value in (("reasoning_content", reasoning), ("content", content)):
            assert value.startswith(self.sent[key]), f"{key}: the stream sent text the reply does not keep"
            if len(value) > len(self.sent[key]):
                out.append({key: value[len(self.sent[key]) :]})
                self.sent[key] = value
        return out

    def _call_deltas(self, calls: list[dict]) -> list[dict]:
        out = [{"tool_calls": [{"index": i} | call]} for i, call in enumerate(calls) if i >= self.num_sent_calls]
        self.num_sent_calls = max(self.num_sent_calls, len(calls))
        return out


def sse(data) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is a string (`[DONE]`)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _window_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, by the tokenizers backend's own decode where that gives
    the same text (no clean-up of tokenization spaces): it skips the wrapper's per-call conversions, a few
    microseconds that a stream pays twice a token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """The streamed text of one sample: grows token by token, never past what the final text may keep.

    The engine cuts the final text before a matched stop string, so the last `max(len(stop))` characters are
    held back until the end; `finish` then sends what remains of the final text. Decoding is incremental and
    costs the same for every burst of tokens, whatever the output's length (a stream that falls behind the engine
    takes its tokens in bursts and so decodes less a token): new tokens are decoded in a window that
    starts a few tokens back (so merges across token boundaries and leading spaces come out as in a whole
    decode), and text is taken only once the window no longer ends inside a UTF-8 character (U+FFFD).
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.decode = _window_decoder(tokenizer) if tokenizer is not None else None
        self.holdback = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        """What was given out so far."""
        self.decoded = ""
        """The decoded text of `ids[:read]`."""
        self.prefix = self.read = 0  # the window: ids[prefix:read] decode to the tail of `decoded`
        self._ids_json, self._ids_encoded = "", 0

    def ids_json(self) -> str:
        """`json.dumps(self.ids)`, grown from the last call's: a chunk that repeats every id so far (SGLang's
        `/generate` stream) then encodes only the new ones."""
        new = self.ids[self._ids_encoded :]
        if new:
            joined = ", ".join(map(str, new))
            self._ids_json = f"{self._ids_json}, {joined}" if self._ids_encoded else joined
            self._ids_encoded = len(self.ids)
        return f"[{self._ids_json}]"

    def add(self, token_id: int, logprob: float) -> str:
        """Append a token; returns the new text that is safe to show (maybe empty)."""
        return self.extend([token_id], [logprob])

    def extend(self, token_ids: list[int], logprobs: list[float]) -> str:
        """Append tokens (a burst that came at once: one window decode for all of them, unless the burst ends inside
        a character, when they are taken one by one as `add` would); returns the new text that is safe to show
        (maybe empty)."""
        first = len(self.ids)
        self.ids += token_ids
        self.logprobs += logprobs
        if self.tokenizer is None:
            return ""
        if not self._take(len(self.ids)):
            for upto in range(first + 1, len(self.ids)):
                self._take(upto)
        end = len(self.decoded) - self.holdback
        if end <= len(self.text):
            return ""
        delta = self.decoded[len(self.text) : end]
        self.text += delta
        return delta

    def _take(self, upto: int) -> bool:
        """Decode the window up to token `upto`; take its new text unless it ends inside a character."""
        window = self.decode(self.ids[self.prefix : self.read])
        grown = self.decode(self.ids[self.prefix : upto])
        if len(grown) > len(window) and not grown.endswith("\ufffd"):
            self.decoded += grown[len(window) :]
            self.prefix, self.read = self.read, upto
            return True
        return False

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.text) :] if final_text.startswith(self.text) else ""
        self.text = final_text
        return delta
