"""Tool-call parsing: valid Hermes/Qwen calls are read, every malformed block is an error naming what is wrong,
never dropped; unknown parsers are refused naming the known ones."""

import pytest

from leagues.agent.tool_calls import TOOL_CALL_PARSERS, error_observation, parse_tool_calls


def test_hermes_calls_are_read_in_order_with_string_or_object_arguments():
    text = (
        'Let me look.\n<tool_call>{"name": "search", "arguments": {"q": "moe"}}</tool_call>\n'
        '<tool_call>\n{"name": "calc", "arguments": "{\\"expr\\": \\"2+3\\"}"}\n</tool_call>'
    )
    calls, errors = parse_tool_calls(text)
    assert errors == []
    assert [(c.name, c.arguments, c.index) for c in calls] == [
        ("search", {"q": "moe"}, 0),
        ("calc", {"expr": "2+3"}, 1),
    ]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ('<tool_call>{"name": "search", "arguments": {"q": }</tool_call>', "invalid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', '"name" string'),
        ('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>', '"arguments" must be an object'),
        ('<tool_call>{"name": "f", "arguments": "not json"}</tool_call>', "not JSON"),
        ('<tool_call>{"name": "f", "arguments": {}}', "not closed"),
    ],
)
def test_a_malformed_call_is_an_error_observation_not_a_silent_drop(block, message):
    good = '<tool_call>{"name": "ok", "arguments": {}}</tool_call>'
    calls, errors = parse_tool_calls(good + block)
    assert [c.name for c in calls] == ["ok"]
    assert len(errors) == 1 and errors[0].index == 1 and message in errors[0].message
    assert errors[0].raw and "tool call 1" in error_observation(errors[0])


def test_parsers_form_a_registry():
    assert "hermes" in TOOL_CALL_PARSERS
    assert parse_tool_calls("no calls here") == ([], [])
    with pytest.raises(ValueError, match="known: hermes"):
        parse_tool_calls("x", "mistral")
