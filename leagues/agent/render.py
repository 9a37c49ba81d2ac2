"""Chat rendering for multi-turn trajectories: the first messages as token ids, and the token bridge that
appends later messages after the model's own turn, without ever re-rendering what is in the ledger.

    render = ChatRender(tokenizer)           # checks at once that the chat template is append-only
    ledger = Ledger(render.prompt(messages, tools))
    ...model samples a turn (ending with its stop token)...
    ledger.append_context(render.bridge([{"role": "tool", "content": "42"}]))

Where it sits: a multi-turn generate function renders with it and keeps the ids in a `Ledger`.

Decisions:
- The bridge is a fixed-prefix diff: a fixed dummy conversation ending with an assistant turn is rendered
  with and without the new messages (plus the generation prompt); what the longer one adds, together with
  whatever the template writes after the assistant's stop token (the model samples the stop token but not,
  for ChatML, the newline after it), is the bridge. So the bridge never depends on what the model said,
  and the model's sampled tokens are never re-tokenized.
- Append-only check: a template that rewrites earlier turns when a message is added (Qwen3 strips earlier
  reasoning; some templates merge consecutive tool messages or move the system prompt) cannot be bridged:
  `ChatRender` renders a suite of 20 synthetic conversations (reasoning, parallel and argument-less calls,
  consecutive tool messages, ...) at every turn boundary (before and after each assistant message) at
  construction and refuses the template, naming the conversation and the first character that changed.
  Consecutive observations are bridged together, so a template may join them (Qwen2.5 wraps consecutive
  tool results in one user turn).
"""

from leagues.agent.ledger import LedgerError

_DUMMY = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def _calls(*pairs: tuple[str, dict]) -> list[dict]:
    return [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(pairs)]  # fmt: skip


def _suite() -> dict[str, list[dict]]:
    """Synthetic conversations that exercise what templates get wrong: reasoning in earlier turns, parallel
    and argument-less calls, consecutive tool messages, system prompts, empty and multi-line content."""
    sys_, user = {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}
    think = {"role": "assistant", "content": "<think>plan</think>answer"}
    reasoning = {"role": "assistant", "content": "answer", "reasoning_content": "plan"}
    one = {"role": "assistant", "content": "", "tool_calls": _calls(("search", {"q": "moe"}))}
    two = {"role": "assistant", "content": "let me", "tool_calls": _calls(("a", {"x": 1}), ("b", {}))}
    empty = {"role": "assistant", "content": "", "tool_calls": _calls(("now", {}))}
    tool = [{"role": "tool", "tool_call_id": f"call_{i}", "content": f"r{i}"} for i in range(3)]
    reply, more = {"role": "assistant", "content": "done"}, {"role": "user", "content": "and then?"}
    return {
        "user, assistant, user": [user, reply, more],
        "system, user, assistant, user": [sys_, user, reply, more],
        "thinking then a user turn": [user, think, more],
        "thinking then a tool result": [sys_, user, think, tool[0]],
        "two thinking turns": [user, think, more, think, more],
        "reasoning_content then a user turn": [user, reasoning, more],
        "one call, its result, an answer": [user, one, tool[0], reply],
        "parallel calls, consecutive results": [user, two, tool[0], tool[1], reply],
        "three consecutive tool messages": [user, two, tool[0], tool[1], tool[2], reply],
        "a call without arguments": [user, empty, tool[0], reply],
        "calls over two turns": [user, one, tool[0], two, tool[0], tool[1], reply],
        "a call after thinking": [user, think, more, one, tool[0], reply],
        "system and parallel calls": [sys_, user, two, tool[0], tool[1], more],
        "a tool result then a user turn": [user, one, tool[0], more],
        "empty user content": [{"role": "user", "content": ""}, reply, more],
        "multi-line content": [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c\n\nd"}, more],
        "long conversation": [user, reply, more, reply, more, reply, more],
        "system only then user": [sys_, more],
        "assistant content and a call": [user, two, tool[0], tool[1], think, more],
        "empty assistant reply": [user, {"role": "assistant", "content": ""}, more],
    }


_SUITE = _suite()


class ChatRender:
    def __init__(self, tokenizer, stop_token: str | None = None) -> None:
        """`stop_token`: the text of the token that ends the model's turn (default: the tokenizer's eos)."""
        self.tokenizer = tokenizer
        self.stop = stop_token or tokenizer.eos_token
        if not self.stop:
            raise LedgerError("chat render: the tokenizer names no eos token; pass stop_token")
        check_append_only(self._text)
        self.stop_ids = self._ids(self.stop)
        """The stop token's ids (one id for a special token)."""

    def _text(self, messages: list[dict], generation_prompt: bool, tools=None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The first messages (and tool schemas) with the generation prompt, as ids."""
        return self._ids(self._text(messages, True, tools))

    def bridge(self, messages: list[dict]) -> list[int]:
        """Ids to append after the model's turn (which ended with its stop token) so the next request is the
        conversation with `messages` added and the generation prompt."""
        before = self._text(_DUMMY, False)
        after = self._text(_DUMMY + list(messages), True)
        end = before.rfind(self.stop)
        if end < 0 or not after.startswith(before):
            raise LedgerError("chat render: the template does not end the assistant's turn with its stop token")
        return self._ids(before[end + len(self.stop) :] + after[len(before) :])


def _boundaries(conversation: list[dict]) -> list[tuple[int, bool]]:
    """Where a trajectory is cut between requests: before each assistant message (with the generation prompt)
    and after it, and the whole conversation as the next request; never between consecutive observations,
    which are bridged together."""
    cuts = []
    for i, message in enumerate(conversation):
        if message["role"] == "assistant":
            cuts += [(i, True), (i + 1, False)]
    return [c for c in cuts if c[0] > 0] + [(len(conversation), conversation[-1]["role"] != "assistant")]


def check_append_only(render) -> None:
    """Raise unless rendering each conversation of the suite at its turn boundaries only ever appends text."""
    for name, conversation in _SUITE.items():
        previous = ""
        for count, generation_prompt in _boundaries(conversation):
            text = render(conversation[:count], generation_prompt)
            if not text.startswith(previous):
                at = next((i for i, (a, b) in enumerate(zip(previous, text, strict=False)) if a != b), len(text))
                raise LedgerError(
                    f"chat template is not append-only: in the conversation ({name}), the text up to message "
                    f"{count} changes the earlier text at character {at} ({previous[at : at + 20]!r} became "
                    f"{text[at : at + 20]!r})"
                )
            previous = text
