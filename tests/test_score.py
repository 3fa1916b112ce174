"""score(): TRL-compatible reward functions -> rewards_per_func [N, F], errors, metrics."""

import asyncio
import functools
import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays

import grpo  # noqa: F401  (fast BLAS before mlx)
from grpo.core.advantages import advantages
from grpo.core.score import (
    RewardContext,
    RewardError,
    Scores,
    as_completions,
    check_reward_fns,
    reward_metrics,
    reward_name,
    reward_names,
    reward_weights,
    score,
)

G = 2
PROMPTS = ["What is 2+3?", "What is 2+3?", "Capital of France?", "Capital of France?"]
COMPLETIONS = ["5", "6", "Paris", "paris"]
IDS = [[1], [2, 3], [4, 5, 6], [7]]
ANSWERS = ["5", "5", "Paris", "Paris"]


def test_trl_style_reward_reads_answer_column():
    def correctness_reward(prompts, completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=False)]

    out = score(PROMPTS, COMPLETIONS, IDS, [correctness_reward], columns={"answer": ANSWERS})
    assert isinstance(out, Scores)
    assert out.names == ("correctness_reward",)
    assert out.rewards_per_func.dtype == mx.float32
    assert out.rewards_per_func.shape == (4, 1)
    np.testing.assert_array_equal(np.array(out.rewards_per_func)[:, 0], [1, 0, 1, 0])


def test_plain_prompts_get_plain_string_completions_and_all_kwargs():
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, kwargs=kwargs)
        return [0.0] * len(prompts)

    columns = {"answer": ANSWERS, "level": [1, 1, 2, 2], "prompt": PROMPTS}
    score(PROMPTS, COMPLETIONS, IDS, [spy], columns=columns, context={"global_step": 7})
    assert seen["prompts"] == PROMPTS
    assert seen["completions"] == COMPLETIONS
    assert seen["ids"] == IDS
    kw = seen["kwargs"]
    # Every other column, row-aligned; "prompt" is not repeated as a kwarg (TRL excludes it).
    assert kw["answer"] == ANSWERS and kw["level"] == [1, 1, 2, 2]
    assert "prompt" not in kw
    assert kw["trainer_state"] == {"global_step": 7}
    assert callable(kw["log_extra"]) and callable(kw["log_metric"])


def test_conversational_format_reward_indexes_first_message():
    prompts = [[{"role": "user", "content": "Think, then answer."}]] * 4
    texts = [
        "<think>a</think><answer>1</answer>",
        "no tags",
        "<think>b</think>",
        "<answer>2</answer>",
    ]
    seen = []

    def format_reward(completions, **kwargs):
        seen.extend(completions)
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        import re

        return [1.0 if re.match(pattern, c[0]["content"]) else 0.0 for c in completions]

    out = score(prompts, texts, IDS, [format_reward])
    assert seen == [[{"role": "assistant", "content": t}] for t in texts]
    np.testing.assert_array_equal(np.array(out.rewards_per_func)[:, 0], [1, 0, 0, 0])


def test_as_completions_passes_through_wrapped_and_plain():
    conv = [[{"role": "user", "content": "hi"}]]
    wrapped = [[{"role": "assistant", "content": "x"}]]
    assert as_completions(conv, wrapped) == wrapped
    assert as_completions(["hi"], ["x"]) == ["x"]
    assert as_completions([], []) == []


def test_function_without_var_kwargs_gets_only_its_named_arguments():
    def strict(completions, answer):  # TRL would crash on the extra kwargs; we filter them
        return [float(c == a) for c, a in zip(completions, answer, strict=False)]

    def progress(completions, trainer_state):
        return [float(trainer_state.global_step)] * len(completions)

    ctx = RewardContext(global_step=3, epoch=0.5)
    out = score(
        PROMPTS,
        COMPLETIONS,
        IDS,
        [strict, progress],
        columns={"answer": ANSWERS, "x": [0] * 4},
        context=ctx,
    )
    r = np.array(out.rewards_per_func)
    np.testing.assert_array_equal(r[:, 0], [1, 0, 1, 0])
    np.testing.assert_array_equal(r[:, 1], [3, 3, 3, 3])
    assert ctx.step == 3


def test_default_trainer_state_is_a_reward_context():
    seen = []
    score(
        PROMPTS,
        COMPLETIONS,
        IDS,
        [lambda trainer_state, **k: seen.append(trainer_state) or [0] * 4],
    )
    assert isinstance(seen[0], RewardContext) and seen[0].global_step == 0


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_none_means_not_applicable_and_all_none_rows_get_zero_advantage(aggregation):
    # Multi-task batch: maths rows (answer given) and a free-text task (no answer).
    prompts = ["m1"] * 3 + ["t1"] * 3
    comps = ["4", "5", "4", "a", "bb", "ccc"]
    task = ["math"] * 3 + ["text"] * 3

    def math_reward(completions, task, **kwargs):
        return [
            float(c == "4") if t == "math" else None
            for c, t in zip(completions, task, strict=False)
        ]

    def text_reward(completions, task, **kwargs):
        # The last text row is unscorable by every function.
        return [
            None if t == "math" or c == "ccc" else float(len(c))
            for c, t in zip(completions, task, strict=False)
        ]

    out = score(prompts, comps, [[0]] * 6, [math_reward, text_reward], columns={"task": task})
    r = np.array(out.rewards_per_func)
    assert np.isnan(r[:3, 1]).all() and np.isnan(r[3:, 0]).all() and np.isnan(r[5]).all()
    w = reward_weights(None, 2)
    adv = advantages(out.rewards_per_func, w, group_size=3, scale="group", aggregation=aggregation)
    a = np.array(adv.advantages)
    assert not np.isnan(a).any()
    assert a[5] == 0.0  # all-None row: no learning signal
    np.testing.assert_allclose(a, _numpy_advantages(r, aggregation, group_size=3), rtol=1e-4)


def _numpy_advantages(r, aggregation, *, group_size, eps=1e-4):
    # TRL 1.16's two aggregations, unit weights, in NumPy; unscorable rows drop out, then get 0.
    def z(x, axis):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are expected here
            return (x - np.nanmean(x, axis, keepdims=True)) / (
                np.nanstd(x, axis, keepdims=True, ddof=1) + eps
            )

    unscorable = np.isnan(r).all(axis=1)
    grouped = r.reshape(-1, group_size, r.shape[1])
    if aggregation == "sum_then_normalize":
        rewards = np.where(unscorable, np.nan, np.nansum(r, axis=1))
        adv = z(rewards.reshape(-1, group_size), 1).reshape(-1)
    else:
        per_func = z(grouped, 1).reshape(r.shape)
        summed = np.where(unscorable, np.nan, np.nansum(per_func, axis=1))
        adv = z(summed, 0)
    return np.nan_to_num(adv, nan=0.0)


def test_async_rewards_run_concurrently():
    # Each coroutine waits for the other's event: run one after the other, this deadlocks
    # (the wait_for guard turns a deadlock into an error instead of a hang).
    events = {}

    def make(mine, theirs):
        async def reward(completions, **kwargs):
            events.setdefault(mine, asyncio.Event()).set()
            await asyncio.wait_for(events.setdefault(theirs, asyncio.Event()).wait(), 30)
            return [1.0 if mine == "a" else 2.0] * len(completions)

        reward.__name__ = f"async_{mine}"
        return reward

    def sync(completions, **kwargs):
        return [3.0] * len(completions)

    out = score(PROMPTS, COMPLETIONS, IDS, [make("a", "b"), sync, make("b", "a")])
    np.testing.assert_array_equal(np.array(out.rewards_per_func), [[1, 3, 2]] * 4)
    assert out.names == ("async_a", "sync", "async_b")


def test_async_reward_inside_a_running_event_loop():
    async def judge(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    async def main():  # e.g. a notebook cell: score() is called from inside a loop
        return score(PROMPTS, COMPLETIONS, IDS, [judge])

    out = asyncio.run(main())
    np.testing.assert_array_equal(np.array(out.rewards_per_func)[:, 0], [1, 1, 5, 5])


def test_async_callable_class_and_partial():
    class Judge:
        async def __call__(self, completions, scale, **kwargs):
            return [scale] * len(completions)

    out = score(PROMPTS, COMPLETIONS, IDS, [functools.partial(Judge(), scale=2.0)])
    np.testing.assert_array_equal(np.array(out.rewards_per_func)[:, 0], [2] * 4)
    assert out.names == ("Judge",)


def test_numpy_and_mx_and_bool_outputs_are_accepted():
    fns = [
        lambda **k: np.array([1, 0, 1, 0], dtype=np.float64),
        lambda **k: mx.array([0.5, 0.5, 0.5, 0.5]),
        lambda **k: [True, False, np.float32(2.5), np.int64(3)],
    ]
    r = np.array(score(PROMPTS, COMPLETIONS, IDS, fns).rewards_per_func)
    np.testing.assert_array_equal(r, [[1, 0.5, 1], [0, 0.5, 0], [1, 0.5, 2.5], [0, 0.5, 3]])


def test_log_metric_and_log_extra_are_collected():
    def logging_reward(completions, log_metric, log_extra, **kwargs):
        log_metric("judge/latency", 2.0)
        log_extra("verdict", ["ok"] * len(completions))
        return [0.0] * len(completions)

    out = score(PROMPTS, COMPLETIONS, IDS, [logging_reward])
    assert out.metrics == {"judge/latency": [2.0]}
    assert out.extra == {"verdict": ["ok"] * 4}


# --- names ---------------------------------------------------------------------------------


def test_reward_names():
    def acc(**k):
        return []

    class Judge:
        def __call__(self, **k):
            return []

    assert reward_name(functools.partial(functools.partial(acc))) == "acc"
    assert reward_name(Judge()) == "Judge"
    assert reward_names([acc, Judge(), acc]) == ("acc_0", "Judge", "acc_1")


# --- errors --------------------------------------------------------------------------------


def bad_length(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def test_error_wrong_length():
    with pytest.raises(RewardError, match=r"'bad_length' returned 3 rewards for 4 completions"):
        score(PROMPTS, COMPLETIONS, IDS, [bad_length])


def test_error_non_list_return():
    def scalar(**kwargs):
        return 1.0

    with pytest.raises(
        RewardError, match=r"'scalar' returned float 1.0; expected a list of 4 floats"
    ):
        score(PROMPTS, COMPLETIONS, IDS, [scalar])


def test_error_non_numeric_names_row_and_value():
    def texty(completions, **kwargs):
        return [1.0, 0.0, "abc", 1.0]

    with pytest.raises(
        RewardError, match=r"'texty' returned a non-numeric value at row 2: 'abc' \(str\)"
    ):
        score(PROMPTS, COMPLETIONS, IDS, [texty])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan")])
def test_error_nan_or_inf_is_never_silently_zeroed(bad):
    def broken(completions, **kwargs):
        return [0.0, bad, 0.0, 0.0]

    with pytest.raises(
        RewardError, match=rf"'broken' returned {float(bad)} at row 1; rewards must be finite"
    ):
        score(PROMPTS, COMPLETIONS, IDS, [broken])


def test_error_exception_inside_is_reraised_with_context():
    def crashes(completions, answer, **kwargs):
        return [1.0 / 0 for _ in completions]

    with pytest.raises(
        RewardError,
        match=r"'crashes' raised ZeroDivisionError while scoring rows 0..3: float division by zero",
    ) as info:
        score(PROMPTS, COMPLETIONS, IDS, [crashes], columns={"answer": ANSWERS})
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_error_exception_inside_async_and_bad_async_output():
    async def acrash(**kwargs):
        raise KeyError("judge down")

    async def ashort(**kwargs):
        return [1.0]

    with pytest.raises(RewardError, match=r"'acrash' raised KeyError") as info:
        score(PROMPTS, COMPLETIONS, IDS, [acrash])
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewardError, match=r"'ashort' returned 1 rewards for 4 completions"):
        score(PROMPTS, COMPLETIONS, IDS, [ashort])


def test_error_missing_column_up_front_and_in_score():
    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    def needs_kwonly(completions, *, difficulty, **kwargs):
        return [0.0] * len(completions)

    def optional(completions, solution=None, **kwargs):
        return [0.0] * len(completions)

    cols = ["prompt", "answer"]
    with pytest.raises(
        RewardError,
        match=r"'needs_solution' requires column\(s\) \['solution'\] that the dataset lacks; dataset columns: \['answer', 'prompt'\]",
    ):
        check_reward_fns([needs_solution], cols)
    with pytest.raises(RewardError, match=r"'needs_kwonly' requires column\(s\) \['difficulty'\]"):
        check_reward_fns([optional, needs_kwonly], cols)
    check_reward_fns([optional, functools.partial(needs_solution, solution=["x"])], cols)
    with pytest.raises(RewardError, match=r"'needs_solution' requires column\(s\) \['solution'\]"):
        score(PROMPTS, COMPLETIONS, IDS, [needs_solution], columns={"answer": ANSWERS})


def test_error_singular_prompt_parameter_explains():
    def wants_prompt(prompt, completions):
        return []

    with pytest.raises(RewardError, match=r"\['prompt'\].*arrive as prompts, completions"):
        check_reward_fns([wants_prompt], ["prompt"])


def test_error_misaligned_inputs_and_columns_and_empty():
    with pytest.raises(RewardError, match=r"column 'answer' has 2 values for 4 completions"):
        score(PROMPTS, COMPLETIONS, IDS, [bad_length], columns={"answer": ["5", "5"]})
    with pytest.raises(RewardError, match=r"got 4 prompts, 3 completions and 4 completion_ids"):
        score(PROMPTS, COMPLETIONS[:3], IDS, [bad_length])
    with pytest.raises(RewardError, match=r"no reward functions"):
        score(PROMPTS, COMPLETIONS, IDS, [])
    with pytest.raises(
        RewardError, match=r"reward function 'x' is not callable \(str\); resolve names"
    ):
        check_reward_fns(["x"], [])


def test_reward_weights():
    np.testing.assert_array_equal(np.array(reward_weights(None, 3)), [1, 1, 1])
    np.testing.assert_array_equal(np.array(reward_weights([0.5, 2], 2)), [0.5, 2])
    with pytest.raises(
        ValueError, match=r"got 3 reward weights for 2 reward functions: \[1, 2, 3\]"
    ):
        reward_weights([1, 2, 3], 2)
    with pytest.raises(ValueError, match=r"reward weights must be finite"):
        reward_weights([1, math.nan], 2)


# --- metrics -------------------------------------------------------------------------------


def test_reward_metrics_hand_computed():
    r = mx.array([[1.0, np.nan], [0.0, 2.0], [1.0, np.nan], [np.nan, np.nan]])
    w = mx.array([1.0, 0.5])
    m = reward_metrics(r, w, mx.array([True, True, False, False]), names=("a", "b"))
    assert m["rewards/a/mean"] == pytest.approx(2 / 3)
    assert m["rewards/a/std"] == pytest.approx(np.std([1, 0, 1], ddof=1))
    assert m["rewards/b/mean"] == pytest.approx(2.0)
    assert math.isnan(m["rewards/b/std"])  # one value: undefined, as TRL's nanstd
    # weighted sums: 1, 0 + 1, 1, NaN (unscorable, excluded)
    assert m["reward"] == pytest.approx(1.0)
    assert m["reward_std"] == pytest.approx(0.0)
    assert m["frac_reward_zero_std"] == pytest.approx(0.5)


@given(
    arrays((6, 3), st.one_of(st.just(float("nan")), st.floats(-5, 5, width=32))),
    arrays((3,), st.floats(0.125, 2.0, width=32)),
)
def test_reward_metrics_match_numpy(r, w):
    m = reward_metrics(
        mx.array(r), mx.array(w), mx.zeros((6,), dtype=mx.bool_), names=("x", "y", "z")
    )
    with np.errstate(all="ignore"):
        for f, name in enumerate("xyz"):
            col = r[:, f][~np.isnan(r[:, f])]
            exp_mean = col.mean() if col.size else np.nan
            exp_std = col.std(ddof=1) if col.size > 1 else np.nan
            np.testing.assert_allclose(m[f"rewards/{name}/mean"], exp_mean, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(m[f"rewards/{name}/std"], exp_std, rtol=1e-4, atol=1e-4)
        scorable = ~np.isnan(r).all(axis=1)
        total = np.nansum(r * w, axis=1)[scorable]
        np.testing.assert_allclose(
            m["reward"], total.mean() if total.size else np.nan, rtol=1e-4, atol=1e-4
        )
        exp = total.std(ddof=1) if total.size > 1 else np.nan
        np.testing.assert_allclose(m["reward_std"], exp, rtol=1e-4, atol=1e-4)
    assert m["frac_reward_zero_std"] == 0.0


def test_reward_metrics_shape_error():
    with pytest.raises(ValueError, match=r"reward_metrics: rewards_per_func \(4, 2\)"):
        reward_metrics(
            mx.zeros((4, 2)), mx.ones((3,)), mx.zeros((4,), dtype=mx.bool_), names=("a", "b")
        )
