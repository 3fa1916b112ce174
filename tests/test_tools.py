"""Tool schemas, tool-call parsing from real chat templates, and running calls safely."""

import asyncio

import pytest
from chat_tokenizers import SPECS, load_tokenizer, template

from grpo.tools import (
    MalformedCall,
    ToolCall,
    check_tools,
    detect_format,
    parse_tool_calls,
    run_tool_calls,
    tool_schema,
)


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


async def async_add(a: int, b: int) -> int:
    """
    Adds two integers, asynchronously.

    Args:
        a: The first integer.
        b: The second integer.
    """
    await asyncio.sleep(0)
    return a + b


def explode(x: str) -> str:
    """
    Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError(f"boom on {x}")


TOOLS = {"multiply": multiply, "async_add": async_add, "explode": explode}


def test_schema_is_transformers_get_json_schema():
    s = tool_schema(multiply)
    assert s["function"]["name"] == "multiply"
    assert s["function"]["description"] == "Multiplies two integers."
    assert s["function"]["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "The first integer.",
    }
    assert s["function"]["parameters"]["required"] == ["a", "b"]


def test_undocumented_tool_is_rejected_with_its_name():
    def nodoc(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="tool 'nodoc' cannot be described"):
        check_tools([nodoc])
    with pytest.raises(TypeError, match="callables"):
        check_tools([3])


# -- parsing what real templates render --------------------------------------------------------

CALLS = [
    {
        "type": "function",
        "id": "call00001",
        "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}},
    },
    {
        "type": "function",
        "id": "call00002",
        "function": {"name": "async_add", "arguments": {"a": 1, "b": -2}},
    },
]


def _assistant_turn(tok, name, calls):
    """What the template renders for an assistant turn with ``calls``, minus its end token."""
    user = [{"role": "user", "content": "What is 3 times 4?"}]
    gen = name != "mistral_nemo"  # Mistral has no generation prompt: the turn follows [/INST]
    kw = dict(tools=[tool_schema(multiply), tool_schema(async_add)], tokenize=False)
    head = tok.apply_chat_template(user, add_generation_prompt=gen, **kw)
    full = tok.apply_chat_template(
        user + [{"role": "assistant", "content": "", "tool_calls": calls}], **kw
    )
    assert full.startswith(head)
    turn = full[len(head) :].rstrip("\n")
    eos = SPECS[name]["eos"]
    assert turn.endswith(eos)
    return turn[: -len(eos)]


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "llama3_1", "mistral_nemo"])
def test_parse_calls_rendered_by_the_template(tmp_path, name):
    tok = load_tokenizer(tmp_path, name)
    assert detect_format(template(name)) == SPECS[name]["format"]
    calls = CALLS[:1] if name == "llama3_1" else CALLS  # Llama 3.1 renders one call per turn
    text = _assistant_turn(tok, name, calls)
    # Through the token ids, as the trainer sees a sampled turn (special tokens kept).
    ids = tok.encode(text, add_special_tokens=False)
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert decoded == text
    content, parsed = parse_tool_calls(decoded, format=SPECS[name]["format"])
    assert content == ("<think>\n\n</think>" if name == "qwen3" else "")  # Qwen3's empty think
    assert [(c.name, c.arguments) for c in parsed] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    if name == "mistral_nemo":
        assert [c.id for c in parsed] == ["call00001", "call00002"]


def test_plain_answers_have_no_calls():
    assert parse_tool_calls("It is 12.", format="hermes") == ("It is 12.", [])
    assert parse_tool_calls("It is 12.", format="llama3") == ("It is 12.", [])
    assert parse_tool_calls("It is 12.", format="mistral") == ("It is 12.", [])


def test_hermes_content_before_calls_and_string_arguments():
    text = 'Let me see.\n<tool_call>\n{"name": "multiply", "arguments": "{\\"a\\": 2, \\"b\\": 5}"}\n</tool_call>'
    content, calls = parse_tool_calls(text, format="hermes")
    assert content == "Let me see."
    assert calls == [ToolCall("multiply", {"a": 2, "b": 5})]


def test_mistral_v11_calls():
    text = '[TOOL_CALLS]multiply[ARGS]{"a": 2, "b": 5}[TOOL_CALLS]async_add{"a": 1, "b": 1}'
    _, calls = parse_tool_calls(text, format="mistral")
    assert calls == [
        ToolCall("multiply", {"a": 2, "b": 5}),
        ToolCall("async_add", {"a": 1, "b": 1}),
    ]


@pytest.mark.parametrize(
    "text, format, error",
    [
        ('<tool_call>\n{"arguments": {"a": 3, "b": 4}}\n</tool_call>', "hermes", "no 'name'"),
        (
            '<tool_call>\n{"name": "multiply", "arguments": {a: 3}}\n</tool_call>',
            "hermes",
            "not valid JSON",
        ),
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 3', "hermes", "not closed"),
        ('<tool_call>["multiply"]</tool_call>', "hermes", "must be a JSON object"),
        ('{"name": "multiply", "parameters": {"a": 3, }', "llama3", "not valid JSON"),
        ('{"name": "multiply", "parameters": [1]}', "llama3", "must be a JSON object"),
        ("[TOOL_CALLS][{'name': 'multiply'}]", "mistral", "not valid JSON"),
        ("[TOOL_CALLS]multiply(a=3)", "mistral", "expected"),
    ],
)
def test_malformed_calls_are_reported_not_raised(text, format, error):
    _, calls = parse_tool_calls(text, format=format)
    assert len(calls) == 1 and isinstance(calls[0], MalformedCall)
    assert error in calls[0].error


def test_unknown_format_and_undetectable_template():
    with pytest.raises(ValueError, match="unknown tool-call format"):
        parse_tool_calls("x", format="xml")
    with pytest.raises(ValueError, match="tool_call_format"):
        detect_format("{{ messages }}")


# -- running calls ------------------------------------------------------------------------------


def test_run_sync_async_and_every_failure_kind():
    calls = [
        ToolCall("multiply", {"a": 3, "b": 4}),
        ToolCall("async_add", {"a": 1, "b": 2}),
        ToolCall("divide", {"a": 1}),
        ToolCall("multiply", {"a": 3, "c": 4}),
        ToolCall("explode", {"x": "now"}),
        MalformedCall("{a:", "the tool call is not valid JSON"),
        ToolCall("async_add", {"a": "x", "b": 1}),  # raises TypeError inside the coroutine
    ]
    results = run_tool_calls(calls, TOOLS)
    assert [(r.name, r.ok) for r in results] == [
        ("multiply", True),
        ("async_add", True),
        ("divide", False),
        ("multiply", False),
        ("explode", False),
        ("unknown", False),
        ("async_add", False),
    ]
    assert results[0].content == "12" and results[1].content == "3"
    assert "unknown tool 'divide'" in results[2].content
    assert "bad arguments for 'multiply'" in results[3].content
    assert "RuntimeError: boom on now" in results[4].content
    assert "malformed tool call" in results[5].content
    assert "TypeError" in results[6].content
    assert all(r.content.startswith("{'error': ") for r in results[2:])


def test_run_inside_a_running_event_loop():
    async def main():
        return run_tool_calls([ToolCall("async_add", {"a": 2, "b": 2})], TOOLS)

    assert asyncio.run(main())[0].content == "4"
