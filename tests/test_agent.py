"""The tool loop on real chat templates: three turns equal a one-shot rendering, failures are
tool messages that are counted, and the budget / iteration limits hold."""

import mlx.core as mx
import numpy as np
import pytest
from chat_tokenizers import SPECS, load_tokenizer
from scripted import Scripted
from test_tools import TOOLS

from grpo.agent import ToolLoop
from grpo.core.sampling import SamplingConfig
from grpo.tools import tool_schema

SCHEMAS = [tool_schema(TOOLS["multiply"]), tool_schema(TOOLS["async_add"])]


def _call(name, args, call_id):
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": args}}


def conversation(name):
    """user -> tool call -> result -> tool call -> result -> answer."""
    one = name == "mistral_nemo"
    return [
        {"role": "user", "content": "What is 3 times 4, plus 1?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call("multiply", {"a": 3, "b": 4}, "call00001")],
        },
        {"role": "tool", "name": "multiply", "content": "12", "tool_call_id": "call00001"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call("async_add", {"a": 12, "b": 1}, "call00002")],
        },
        {"role": "tool", "name": "async_add", "content": "13", "tool_call_id": "call00002"},
        {"role": "assistant", "content": "It is 13." if not one else "It is 13."},
    ]


def _render(tok, messages, **kw):
    text = tok.apply_chat_template(messages, tools=SCHEMAS, tokenize=False, **kw)
    return tok.encode(text, add_special_tokens=False)


def _turn_ids(tok, messages, k, eos):
    """The ids the template renders for assistant message ``k``, up to its EOS (what a model
    trained on this template samples)."""
    head = _render(tok, messages[:k], add_generation_prompt=True)
    full = _render(tok, messages[: k + 1])
    assert full[: len(head)] == head
    turn = full[len(head) :]
    return turn[: turn.index(eos) + 1]


def _loop(tok, script, tools, *, max_tokens=400, max_iterations=None, G=1, prompt=None):
    loop = ToolLoop(tok, max_iterations=max_iterations)
    prompt = prompt or _render(tok, conversation("x")[:1], add_generation_prompt=True)
    sampler = Scripted(script)
    eos = tok.eos_token_id
    out = loop.run(
        {},
        mx.random.key(0),
        [prompt],
        [tools] * G,
        model=None,
        sampling=SamplingConfig(group_size=G, max_tokens=max_tokens, eos_ids=(eos,)),
        sampler=sampler,
    )
    return out, sampler, prompt


@pytest.mark.parametrize("name", ["qwen2_5", "llama3_1", "mistral_nemo"])
def test_three_turns_equal_the_one_shot_rendering(tmp_path, name):
    tok = load_tokenizer(tmp_path, name)
    eos = tok.eos_token_id
    msgs = conversation(name)
    turns = [_turn_ids(tok, msgs, k, eos) for k in (1, 3, 5)]
    out, sampler, prompt = _loop(tok, [[t] for t in turns], TOOLS)
    n = int(out.rollout.completion_lengths[0])
    ids = np.array(out.rollout.completion_ids[0, :n]).tolist()
    mask = np.array(out.tool_mask[0, :n])
    # The prompt and every appended delta together are the template's one-shot rendering.
    one_shot = _render(tok, msgs)
    assert prompt + ids == one_shot[: len(prompt) + n]
    assert set(one_shot[len(prompt) + n :]) <= set(tok.encode("\n", add_special_tokens=False))
    # Turn 1's ids are a prefix of the ids after turn 3; model tokens are exactly the turns.
    assert ids[: len(turns[0])] == turns[0]
    assert [ids[i] for i in np.flatnonzero(mask)] == turns[0] + turns[1] + turns[2]
    assert mask[: len(turns[0])].all() and mask[-len(turns[2]) :].all()
    assert int(out.rollout.completion_lengths[0]) == n and not bool(out.rollout.is_truncated[0])
    # Each later turn was sampled from the prompt plus everything appended so far.
    assert [c[0][0] for c in sampler.calls[1:]] == [
        prompt + ids[: len(c[0][0]) - len(prompt)] for c in sampler.calls[1:]
    ]
    # The completion handed to rewards: the assistant and tool messages, in order.
    roles = [(m["role"], m.get("name"), m["content"]) for m in out.completions[0]]
    assert roles == [
        ("assistant", None, ""),
        ("tool", "multiply", "12"),
        ("assistant", None, ""),
        ("tool", "async_add", "13"),
        ("assistant", None, "It is 13."),
    ]
    assert out.completions[0][0]["tool_calls"][0]["function"] == {
        "name": "multiply",
        "arguments": {"a": 3, "b": 4},
    }
    assert out.metrics["tools/call_frequency"] == 2.0
    assert out.metrics["tools/failure_frequency"] == 0.0
    assert out.metrics["tools/turns_per_completion"] == 3.0
    assert out.metrics["tools/calls/multiply"] == 1.0


def _text_turn(tok, text):
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


def test_failures_are_tool_messages_and_counted(tmp_path):
    tok = load_tokenizer(tmp_path, "qwen2_5")
    bad = [
        '<tool_call>\n{"name": "multiply", "arguments": {a: 3}}\n</tool_call>',  # malformed
        '<tool_call>\n{"name": "divide", "arguments": {"a": 3}}\n</tool_call>',  # unknown
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "c": 4}}\n</tool_call>',  # args
        '<tool_call>\n{"name": "explode", "arguments": {"x": "y"}}\n</tool_call>',  # raises
    ]
    script = [[_text_turn(tok, t) for t in bad], [_text_turn(tok, "ok")] * 4]
    out, sampler, prompt = _loop(tok, script, TOOLS, G=4)
    assert out.metrics["tools/call_frequency"] == 1.0
    assert out.metrics["tools/failure_frequency"] == 1.0
    errors = [row[1]["content"] for row in out.completions]
    assert "malformed tool call" in errors[0]
    assert "unknown tool 'divide'" in errors[1]
    assert "bad arguments for 'multiply'" in errors[2]
    assert "RuntimeError: boom on y" in errors[3]
    # The run went on: every row got a second turn that saw its error message.
    assert len(sampler.calls) == 2 and len(sampler.calls[1][0]) == 4
    for context, err in zip(sampler.calls[1][0], errors, strict=True):
        assert err in tok.decode(context)
    assert [m["content"] for row in out.completions for m in row[2:]] == ["ok"] * 4


def test_max_iterations_stops_the_loop(tmp_path):
    tok = load_tokenizer(tmp_path, "qwen2_5")
    call = _text_turn(
        tok, '<tool_call>\n{"name": "multiply", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    )
    out, sampler, _ = _loop(tok, [[call], [call], [call]], TOOLS, max_iterations=1)
    assert len(sampler.calls) == 2  # one round of tools, then the final turn
    assert out.metrics["tools/call_frequency"] == 1.0
    assert [m["role"] for m in out.completions[0]] == ["assistant", "tool", "assistant"]


def test_a_result_that_does_not_fit_ends_the_row(tmp_path):
    tok = load_tokenizer(tmp_path, "qwen2_5")
    call = _text_turn(
        tok, '<tool_call>\n{"name": "multiply", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    )
    out, sampler, _ = _loop(tok, [[call]], TOOLS, max_tokens=len(call) + 10)
    assert len(sampler.calls) == 1
    assert [m["role"] for m in out.completions[0]] == ["assistant"]  # the result is dropped
    assert int(out.rollout.completion_lengths[0]) == len(call)


def test_template_without_prefix_preservation_is_rejected(tmp_path):
    tok = load_tokenizer(tmp_path, "qwen2_5")
    # A template that renders the whole history differently once a tool message follows.
    tok.chat_template = (
        "{% for m in messages %}{% if messages[-1].role == 'tool' %}!{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<tool_call><|im_end|>\n{% endfor %}"
    )
    loop = ToolLoop(tok)
    with pytest.raises(ValueError, match="not prefix-preserving"):
        loop.suffix_ids([{"role": "tool", "name": "f", "content": "1", "tool_call_id": "c"}])


def test_format_is_detected_from_the_template(tmp_path):
    for name, spec in SPECS.items():
        assert ToolLoop(load_tokenizer(tmp_path, name)).format == spec["format"]
