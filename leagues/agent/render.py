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
  `ChatRender` renders a suite of synthetic conversations message by message at construction and refuses
  the template, naming the conversation and the first character that changed.
"""

from leagues.agent.ledger import LedgerError

_DUMMY = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
_SUITE = {
    "user, assistant, user": [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    ],
    "system, user, assistant, tool, tool": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>plan</think>call"},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ],
}


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


def check_append_only(render) -> None:
    """Raise unless rendering each conversation of the suite message by message only ever appends text."""
    for name, conversation in _SUITE.items():
        previous = ""
        for count in range(1, len(conversation) + 1):
            text = render(conversation[:count], False)
            if not text.startswith(previous):
                at = next((i for i, (a, b) in enumerate(zip(previous, text, strict=False)) if a != b), len(text))
                raise LedgerError(
                    f"chat template is not append-only: in the conversation ({name}), adding message {count} "
                    f"changes the earlier text at character {at} ({previous[at : at + 20]!r} became "
                    f"{text[at : at + 20]!r})"
                )
            previous = text
