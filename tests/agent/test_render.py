"""Chat rendering for multi-turn trajectories with the tiny model's ChatML template: the ids of a trajectory
built from the prompt, the model's turns and bridges equal the template's rendering of the whole conversation;
a template that rewrites earlier turns is refused naming where."""

import pytest

from leagues.agent import Ledger, LedgerError
from leagues.agent.render import ChatRender
from leagues.model import load_tokenizer, resolve_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tiny-moe"))


def test_prompt_turns_and_bridges_equal_the_whole_conversation_rendered(tokenizer):
    render = ChatRender(tokenizer)
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "2+3="}]
    ledger = Ledger(render.prompt(messages))
    for reply, observation in (
        ("5", {"role": "user", "content": "and 4+4?"}),
        ("8", {"role": "tool", "content": "ok"}),
    ):
        sampled = tokenizer.encode(reply + tokenizer.eos_token, add_special_tokens=False)  # what the model samples
        ledger.append_sampled(sampled, [0.0] * len(sampled), weight_version=0)
        ledger.append_context(render.bridge([observation]))
        messages += [{"role": "assistant", "content": reply}, observation]
    whole = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ledger.token_ids == tokenizer.encode(whole, add_special_tokens=False)


def test_a_template_that_is_not_append_only_is_refused(tokenizer):
    class DropsThinking:
        """Like Qwen3's template: earlier assistant turns lose their <think> part once a message follows."""

        eos_token = tokenizer.eos_token

        def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
            parts = []
            for i, m in enumerate(messages):
                content = m["content"]
                if m["role"] == "assistant" and i < len(messages) - 1:
                    content = content.split("</think>")[-1]
                parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
            return "".join(parts) + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    refused = r"not append-only: in the conversation \(thinking then a user turn\), the text up to message 3"
    with pytest.raises(LedgerError, match=refused):
        ChatRender(DropsThinking())


def test_a_template_that_joins_consecutive_tool_results_is_bridged_whole(tokenizer):
    class JoinsToolResults:
        """Like Qwen2.5's template: consecutive tool messages share one user turn."""

        eos_token = tokenizer.eos_token
        encode = staticmethod(tokenizer.encode)

        def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
            text = ""
            for i, m in enumerate(messages):
                if m["role"] != "tool":
                    text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                    continue
                first = i == 0 or messages[i - 1]["role"] != "tool"
                last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
                text += ("<|im_start|>user" if first else "") + f"\n<r>{m['content']}</r>"
                text += "<|im_end|>\n" if last else ""
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    render, template = ChatRender(JoinsToolResults()), JoinsToolResults()
    messages = [{"role": "user", "content": "q"}]
    ledger = Ledger(render.prompt(messages))
    sampled = tokenizer.encode("call" + tokenizer.eos_token, add_special_tokens=False)
    ledger.append_sampled(sampled, [0.0] * len(sampled), weight_version=0)
    results = [{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    ledger.append_context(render.bridge(results))
    whole = template.apply_chat_template([*messages, {"role": "assistant", "content": "call"}, *results],
                                         add_generation_prompt=True)  # fmt: skip
    assert ledger.token_ids == tokenizer.encode(whole, add_special_tokens=False)
