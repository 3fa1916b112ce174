import math  # noqa: I001  (grpo must be imported before mlx)

import grpo  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference_numpy import np_nanmean, np_nanstd
from strategies import arrays, reward_values

from grpo.core.numerics import masked_mean, masked_sum, nan_count, nanmean, nansum, nanstd, safe_div

nan = float("nan")


# (a) hand-computed -------------------------------------------------------------------


def test_safe_div_hand():
    out = safe_div(mx.array([1.0, 2.0, -3.0]), mx.array([0.0, 4.0, 0.0]), fill=7.0)
    np.testing.assert_array_equal(np.array(out), [7.0, 0.5, 7.0])


def test_safe_div_gradient_is_finite_at_zero_denominator():
    g = mx.grad(lambda d: safe_div(mx.array([1.0, 2.0]), d).sum())(mx.array([0.0, 2.0]))
    np.testing.assert_allclose(np.array(g), [0.0, -0.5])


def test_masked_mean_hand():
    x = mx.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = mx.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.array(masked_mean(x, m, axis=1)), [1.5, 0.0])
    np.testing.assert_allclose(float(masked_mean(x, m)), 1.5)
    np.testing.assert_allclose(np.array(masked_sum(x, m, axis=0)), [1.0, 2.0, 0.0])
    assert masked_mean(x, m, axis=1, keepdims=True).shape == (2, 1)


def test_masked_positions_never_leak_nan_or_gradient():
    x = mx.array([1.0, nan, math.inf, 2.0])
    m = mx.array([1.0, 0.0, 0.0, 1.0])
    assert float(masked_mean(x, m)) == 1.5
    g = mx.grad(lambda x: masked_mean(x, m))(x)
    np.testing.assert_array_equal(np.array(g), [0.5, 0.0, 0.0, 0.5])


def test_nan_stats_hand():
    x = mx.array([[1.0, nan, 3.0], [nan, nan, nan], [2.0, nan, nan], [0.5, 0.5, 1.5]])
    np.testing.assert_allclose(np.array(nanmean(x, 1)), [2.0, nan, 2.0, 2.5 / 3])
    np.testing.assert_allclose(np.array(nansum(x, 1)), [4.0, 0.0, 2.0, 2.5])
    np.testing.assert_array_equal(np.array(nan_count(x, 1)), [2, 0, 1, 3])
    # unbiased: var([1, 3]) = 2; one valid value -> NaN (TRL's nanstd); [.5,.5,1.5] -> 1/sqrt(3)
    np.testing.assert_allclose(
        np.array(nanstd(x, 1)), [math.sqrt(2.0), nan, nan, 1 / math.sqrt(3)], rtol=1e-6
    )


def test_uniform_values_have_exactly_zero_spread():
    # 0.1 is inexact in binary; a plain sum/count mean would be off by an ulp.
    x = mx.array([[0.1] * 7, [3.3] * 7])
    assert (np.array(nanmean(x, 1)) == np.float32([0.1, 3.3])).all()
    assert (np.array(nanstd(x, 1)) == 0).all()


def test_low_precision_inputs_reduce_in_float32():
    x = mx.array([1.0, 2.0, 4.0]).astype(mx.bfloat16)
    for out in (masked_mean(x, mx.ones(3)), nanmean(x), nanstd(x), nansum(x)):
        assert out.dtype == mx.float32


# (b) properties vs NumPy --------------------------------------------------------------


@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 5)), elements=reward_values),
    st.sampled_from([None, 0, 1, -1, (0, 1)]),
)
def test_nan_stats_match_numpy(x, axis):
    for ours, ref in ((nanmean, np_nanmean), (nanstd, np_nanstd)):
        got = np.array(ours(mx.array(x), axis))
        want = ref(x.astype(np.float64), axis=axis)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.array(nansum(mx.array(x), axis)), np.nansum(x.astype(np.float64), axis=axis), atol=1e-4
    )


@given(st.data())
def test_masked_mean_matches_numpy(data):
    x = data.draw(arrays((3, 4)))
    m = data.draw(hnp.arrays(np.float32, (3, 4), elements=st.sampled_from([0.0, 1.0])))
    axis = data.draw(st.sampled_from([None, 0, 1]))
    got = np.array(masked_mean(mx.array(x), mx.array(m), axis))
    want = (x * m).sum(axis=axis) / np.maximum(m.sum(axis=axis), 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# (c) compile ------------------------------------------------------------------------


def test_compiled_equals_uncompiled():
    x = mx.array([[1.0, nan, 3.0, 0.0], [nan, nan, nan, nan], [2.0, 2.0, nan, 5.0]])
    m = (~mx.isnan(x)).astype(mx.float32)

    def f(x, m):
        return nanmean(x, 1), nanstd(x, 1), nanstd(x), masked_mean(x, m, 1), safe_div(x, m)

    for a, b in zip(mx.compile(f)(x, m), f(x, m), strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("fn", [nanmean, nanstd])
def test_axis_and_keepdims_shapes(fn):
    x = mx.zeros((2, 3, 4))
    assert fn(x).shape == ()
    assert fn(x, 1).shape == (2, 4)
    assert fn(x, (0, 2), keepdims=True).shape == (1, 3, 1)
    assert fn(x, -1).shape == (2, 3)
