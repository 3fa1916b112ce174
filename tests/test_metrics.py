"""Evaluation metrics: unbiased pass@k, mean@k, the paired bootstrap interval."""

from math import comb

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpo.core.metrics import (
    accuracy,
    mean_at_k,
    mean_length,
    mean_pass_at_k,
    paired_bootstrap,
    pass_at_k,
    truncation_rate,
)

# -- (a) hand-computed cases ------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
        (5, 2, 3, 1 - 1 / 10),  # C(3,3)/C(5,3) = 1/10
        (5, 2, 4, 1.0),  # n - c < k: some pick of 4 always holds a correct one
        (4, 0, 2, 0.0),
        (4, 4, 1, 1.0),
        (10, 1, 10, 1.0),
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)=21, C(10,5)=252
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1000) overflows float64; the product form does not.
    got = pass_at_k(2000, 1, 1000)
    assert got == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(2000, 300, 5) == pytest.approx(1 - comb(1700, 5) / comb(2000, 5), rel=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_mean_pass_at_k_and_friends_hand_computed():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    # pass@2 per prompt: 1 - C(3,2)/C(4,2) = 1/2; 1 - C(2,2)/C(4,2) = 5/6; 0.
    assert mean_pass_at_k(correct, 2) == pytest.approx((1 / 2 + 5 / 6 + 0) / 3)
    assert mean_pass_at_k(correct, 1) == pytest.approx(3 / 12)
    rewards = np.array([[1.0, 0.5], [0.0, 0.5]])
    assert mean_at_k(rewards, 2) == pytest.approx(0.5)
    assert mean_length(np.array([[2, 4], [6, 8]])) == 5.0
    assert truncation_rate(np.array([[True, False], [False, False]])) == 0.25
    assert accuracy(np.array([[True], [False], [True], [True]])) == 0.75


# -- (b) properties ---------------------------------------------------------------------------


@st.composite
def correctness(draw):
    B, n = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    flat = draw(st.lists(st.booleans(), min_size=B * n, max_size=B * n))
    return np.array(flat, bool).reshape(B, n)


@given(correctness())
def test_pass_at_k_monotone_bounded_and_accuracy_at_1(correct):
    n = correct.shape[1]
    values = [mean_pass_at_k(correct, k) for k in range(1, n + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(x <= y + 1e-12 for x, y in zip(values, values[1:], strict=False))
    assert values[0] == pytest.approx(correct.mean())
    # At k = n it is "any correct".
    assert values[-1] == pytest.approx(correct.any(axis=1).mean())


@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_matches_binomial_formula(nc):
    n, c = nc
    for k in range(1, n + 1):
        expected = 1.0 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-9)


# -- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_contains_the_true_difference_and_is_seeded():
    rng = np.random.default_rng(0)
    B = 400
    a = rng.binomial(1, 0.4, size=B).astype(float)
    b = np.clip(a + rng.binomial(1, 0.25, size=B), 0, 1)  # b improves on some prompts
    true_diff = 0.6 * 0.25  # P(a = 0) * P(flip)
    ci = paired_bootstrap(a, b, seed=3)
    assert ci.low <= true_diff <= ci.high
    assert ci.low <= ci.estimate <= ci.high
    assert ci.estimate == pytest.approx(b.mean() - a.mean())
    assert paired_bootstrap(a, b, seed=3) == ci
    # Endpoints are multiples of 1/B, so two seeds may agree; five never all do here.
    assert len({paired_bootstrap(a, b, seed=s) for s in range(5)}) > 1


def test_bootstrap_of_identical_models_is_zero_width():
    a = np.array([0.1, 0.5, 0.9, 0.3])
    assert tuple(paired_bootstrap(a, a.copy())) == (0.0, 0.0, 0.0)


def test_bootstrap_excludes_zero_for_a_clear_gain_and_checks_shapes():
    a = np.zeros(50)
    b = np.ones(50)
    ci = paired_bootstrap(a, b, seed=0)
    assert ci == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
