"""Built-in reward functions and resolve_reward_funcs."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import grpo  # noqa: F401  (fast BLAS before mlx)
from grpo import rewards
from grpo.core.score import RewardContext, score
from grpo.rewards import (
    REWARD_FUNCS,
    LengthPenalty,
    answer_match,
    answers_match,
    completion_text,
    extract_answer,
    length_penalty,
    normalize_answer,
    parse_number,
    register_reward,
    resolve_reward_funcs,
    think_format,
)


def conv(text):
    return [{"role": "assistant", "content": text}]


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    with pytest.raises(
        TypeError,
        match=r"completion must be a string or a list of \{role, content\} messages, got 3",
    ):
        completion_text(3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
        ("Natalia sold 48 clips ... #### 72", "72"),
        ("  just text  ", "just text"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, value",
    [
        ("72", Fraction(72)),
        ("-3", Fraction(-3)),
        ("0.75", Fraction(3, 4)),
        ("3/4", Fraction(3, 4)),
        ("1,000", Fraction(1000)),
        ("$5.", Fraction(5)),
        (r"\frac{1}{3}", Fraction(1, 3)),
        ("1e3", Fraction(1000)),
        ("abc", None),
        ("1/0", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_normalize_answer():
    assert normalize_answer("  The   Answer. ") == "the answer"
    assert normalize_answer("$1,234$") == "1234"


@pytest.mark.parametrize(
    "pred, ref, ok",
    [
        ("<answer>72</answer>", "Natalia sold ... #### 72", True),
        ("<answer>72.0</answer>", "72", True),
        ("<answer>3/4</answer>", "0.75", True),
        ("<answer>1,000</answer>", "1000", True),
        ("<answer>Paris</answer>", "paris", True),
        ("<answer>71</answer>", "72", False),
        ("<answer></answer>", "5", False),
        ("I think 72", "72", False),  # no extraction anchor: whole text must match
        (r"\boxed{12}", "12", True),
    ],
)
def test_answers_match_plain(pred, ref, ok):
    assert answers_match(pred, ref, use_math_verify=False) is ok


def test_answers_match_math_verify():
    pytest.importorskip("math_verify")
    assert answers_match("<answer>x+1</answer>", "1+x", use_math_verify=True)
    assert answers_match(r"<answer>\frac{2}{4}</answer>", r"\frac12", use_math_verify=True)
    assert not answers_match("<answer>x+2</answer>", "1+x", use_math_verify=True)
    # Words are not maths: math-verify would read both as products of the same symbols.
    assert not answers_match("<answer>pairs</answer>", "paris", use_math_verify=True)
    # Without math-verify the symbolic match is out of reach.
    assert not answers_match("<answer>x+1</answer>", "1+x", use_math_verify=False)


@pytest.mark.parametrize("math_verify", [False, True])
def test_answer_match_through_score_plain_and_conversational(monkeypatch, math_verify):
    if math_verify:
        pytest.importorskip("math_verify")
    monkeypatch.setattr(rewards, "HAS_MATH_VERIFY", math_verify)
    texts = ["<answer>5</answer>", "<answer>6</answer>", "<answer>Paris</answer>", "whatever"]
    answers = ["5", "5", "Paris", None]  # last row: no reference -> not applicable
    for prompts in (["q"] * 4, [[{"role": "user", "content": "q"}]] * 4):
        out = score(prompts, texts, [[0]] * 4, [answer_match], columns={"answer": answers})
        r = np.array(out.rewards_per_func)[:, 0]
        np.testing.assert_array_equal(r[:3], [1, 0, 1])
        assert np.isnan(r[3])
        assert out.names == ("answer_match",)


def test_answer_match_accepts_numeric_answer_column():
    assert answer_match(["<answer>12</answer>", "<answer>12.5</answer>"], [12, 12.5]) == [1.0, 1.0]


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think>reason</think><answer>4</answer>", True),
        ("<think>\nreason\n</think>\n<answer>\n4\n</answer>\n", True),
        ("<think>a</think>", False),
        ("<answer>4</answer>", False),
        ("<think>a</think><think>b</think><answer>4</answer>", False),
        ("<think>a</think><answer>4</answer> trailing", False),
        ("<answer>4</answer><think>a</think>", False),
    ],
)
def test_think_format(text, ok):
    assert think_format([text]) == [float(ok)]
    assert think_format([conv(text)]) == [float(ok)]


def dapo_reference(length, max_length, cache):
    # Eq. 13 of the DAPO paper, written independently of the implementation.
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0


@pytest.mark.parametrize("length", [0, 6, 7, 8, 9, 10, 11, 30])
def test_length_penalty_hand_values(length):
    fn = LengthPenalty(max_length=10, cache=4)
    assert fn(completion_ids=[[0] * length]) == [pytest.approx(dapo_reference(length, 10, 4))]


def test_length_penalty_reads_context_budget():
    ids = [[0] * n for n in (5, 6, 7, 8)]
    # max_completion_length 8 -> cache 2: free up to 6 tokens, then -0.5 per token.
    expected = [0.0, 0.0, -0.5, -1.0]
    assert length_penalty(ids, trainer_state=RewardContext(max_completion_length=8)) == expected
    assert length_penalty(ids, trainer_state={"max_completion_length": 8}) == expected
    out = score(
        ["p"] * 4, ["a"] * 4, ids, [length_penalty], context=RewardContext(max_completion_length=8)
    )
    np.testing.assert_array_equal(np.array(out.rewards_per_func)[:, 0], expected)
    assert out.names == ("length_penalty",)
    # No budget anywhere: 1024 tokens with a 256-token ramp.
    assert length_penalty([[0] * 768, [0] * 1024]) == [0.0, -1.0]


def test_length_penalty_rejects_bad_limits():
    with pytest.raises(ValueError, match=r"length_penalty: max_length must be >= 1, got 0"):
        LengthPenalty(max_length=0)
    with pytest.raises(ValueError, match=r"length_penalty: cache must be >= 1, got 0"):
        LengthPenalty(cache=0)


@given(st.lists(st.integers(0, 64), min_size=1, max_size=8), st.integers(1, 32), st.integers(1, 40))
def test_length_penalty_range_and_monotone(lengths, max_length, cache):
    fn = LengthPenalty(max_length=max_length, cache=cache)
    out = fn([[0] * n for n in sorted(lengths)])
    assert all(-1.0 <= v <= 0.0 for v in out)
    assert all(a >= b for a, b in zip(out, out[1:], strict=False))


@given(st.text(max_size=40), st.text(max_size=10))
def test_match_and_format_ranges(text, ref):
    assert answer_match([text], [ref])[0] in (0.0, 1.0)
    assert think_format([text])[0] in (0.0, 1.0)


# --- resolve_reward_funcs ------------------------------------------------------------------


def my_reward(completions, **kwargs):
    return [0.0] * len(completions)


def test_resolve_reward_funcs_forms(tmp_path):
    assert resolve_reward_funcs(my_reward) == [my_reward]
    assert resolve_reward_funcs("think_format") == [think_format]
    assert resolve_reward_funcs("answer_match, think_format") == [answer_match, think_format]
    assert resolve_reward_funcs([my_reward, "length_penalty"]) == [my_reward, length_penalty]
    assert resolve_reward_funcs(["grpo.rewards:think_format"]) == [think_format]
    assert resolve_reward_funcs("grpo.rewards:LengthPenalty.__call__")[0] is LengthPenalty.__call__
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def shout(completions, **kw):\n    return [float(c.isupper()) for c in completions]\n"
    )
    (fn,) = resolve_reward_funcs(f"{path}:shout")
    assert fn(completions=["AB", "ab"]) == [1.0, 0.0]


def test_register_reward():
    @register_reward("always_one_test")
    def always_one(completions, **kwargs):
        return [1.0] * len(completions)

    try:
        assert resolve_reward_funcs("always_one_test") == [always_one]
    finally:
        REWARD_FUNCS.pop("always_one_test")


def test_resolve_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown reward function 'acuracy'; known built-ins: answer_match, .*length_penalty, .*think_format",
    ):
        resolve_reward_funcs("acuracy")
    with pytest.raises(
        ValueError, match=r"cannot load reward function 'no_such_mod_xyz:f': ModuleNotFoundError"
    ):
        resolve_reward_funcs("no_such_mod_xyz:f")
    with pytest.raises(
        ValueError, match=r"cannot load reward function 'grpo.rewards:nope': AttributeError"
    ):
        resolve_reward_funcs("grpo.rewards:nope")
    with pytest.raises(
        ValueError, match=r"reward function 'grpo.rewards:HAS_MATH_VERIFY' is not callable"
    ):
        resolve_reward_funcs("grpo.rewards:HAS_MATH_VERIFY")
    with pytest.raises(
        ValueError, match=r"cannot load reward function '.*missing.py:f': FileNotFoundError"
    ):
        resolve_reward_funcs(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(ValueError, match=r"no reward functions in ' , '"):
        resolve_reward_funcs(" , ")
    with pytest.raises(
        TypeError, match=r"reward function spec must be a callable or a string, got 3"
    ):
        resolve_reward_funcs([3])


def test_task_rewards_resolve_by_name_without_importing_tasks_first():
    import subprocess
    import sys

    code = (
        "import sys, grpo\nfrom grpo.rewards import resolve_reward_funcs\n"
        "print(resolve_reward_funcs('exact_match')[0].__module__)\n"
        "assert 'grpo.tasks' not in sys.modules  # the tasks' reward is a plain built-in\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "grpo.rewards"


# -- unit_tests: sandboxed code reward ---------------------------------------------------------


def test_unit_tests_pass_fail_timeout_network_and_none():
    from grpo.rewards import UnitTests, extract_code, resolve_reward_funcs

    reward = UnitTests(timeout=2.0, workers=2)
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    loops = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    network = (
        "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\n"
        "def add(a, b):\n    return a + b\n```"
    )
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    completions = [good, wrong, loops, network, [{"role": "assistant", "content": good}], good]
    got = reward(completions=completions, tests=[tests] * 5 + [None])
    assert got == [1.0, 0.0, 0.0, 0.0, 1.0, None]
    # A list of test lines works too; the tests see only the completion's code block.
    assert reward(completions=[good], tests=[["assert add(1, 1) == 2"]]) == [1.0]
    assert extract_code("no fences") == "no fences"
    assert resolve_reward_funcs("unit_tests")[0].__name__ == "unit_tests"
    with pytest.raises(ValueError, match="timeout"):
        UnitTests(timeout=0)


def test_run_python_exit_status_and_sandbox():
    from grpo.rewards import run_python

    assert run_python("import sys; sys.exit(0)", timeout=5.0) is True
    assert run_python("raise SystemExit(3)", timeout=5.0) is False
    # Isolated: an empty environment and a fresh, empty working directory.
    assert run_python("import os; assert not os.environ.get('HOME')", timeout=5.0) is True
    assert run_python("import os; assert os.listdir('.') == []", timeout=5.0) is True
