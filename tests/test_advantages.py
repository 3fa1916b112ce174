import itertools  # noqa: I001  (grpo must be imported before mlx)
import math

import grpo  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from reference_numpy import np_advantages, np_nanstd
from strategies import coarse_reward_values, reward_matrices

from grpo.core.advantages import AGGREGATIONS, SCALES, Advantages, advantages, make_advantages

nan = float("nan")
EPS = 1e-4
SETTINGS = list(itertools.product(SCALES, AGGREGATIONS))


def _adv(rpf, weights, G, scale="group", aggregation="sum_then_normalize"):
    out = advantages(
        mx.array(np.asarray(rpf, np.float32)),
        mx.array(np.asarray(weights, np.float32)),
        group_size=G,
        scale=scale,
        aggregation=aggregation,
    )
    assert isinstance(out, Advantages)
    return tuple(np.array(a) for a in out)


def _scorable(rpf):
    return ~np.isnan(np.asarray(rpf)).all(axis=1)


# (a) hand-computed ----------------------------------------------------------------------


def test_hand_group_with_unscorable_row():
    # group [1, 2, 3, None]: mean 2, unbiased std 1; the None row is left out and gets 0.
    adv, rewards, zero = _adv([[1.0], [2.0], [3.0], [nan]], [1.0], 4)
    np.testing.assert_allclose(adv, [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0], rtol=1e-6)
    np.testing.assert_array_equal(rewards, [1.0, 2.0, 3.0, nan])
    assert not zero.any()


def test_hand_weighted_nansum_across_functions():
    # row 0: 2*1 + NaN skipped = 2; row 1: 2*0 + 0.5*2 = 1; mean 1.5, std sqrt(0.5)
    adv, rewards, _ = _adv([[1.0, nan], [0.0, 2.0]], [2.0, 0.5], 2)
    np.testing.assert_allclose(rewards, [2.0, 1.0])
    s = math.sqrt(0.5)
    np.testing.assert_allclose(adv, [0.5 / (s + EPS), -0.5 / (s + EPS)], rtol=1e-6)


def test_hand_zero_std_group_gives_zero_and_flag():
    adv, _, zero = _adv([[1.0], [1.0], [1.0], [0.0], [2.0], [nan]], [1.0], 3)
    np.testing.assert_array_equal(adv[:3], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(zero, [True, True, True, False, False, False])


def test_hand_single_scorable_row_in_group():
    # unbiased std of one value is undefined (NaN in TRL) -> advantage 0, not flagged zero-std
    adv, rewards, zero = _adv([[3.0], [nan], [0.0], [1.0]], [1.0], 2)
    np.testing.assert_array_equal(adv[:2], [0.0, 0.0])
    np.testing.assert_array_equal(rewards[:2], [3.0, nan])
    np.testing.assert_array_equal(zero, [False, False, False, False])


def test_hand_scale_none_only_centres():
    adv, _, zero = _adv([[1.0], [3.0], [5.0], [5.0]], [1.0], 2, scale="none")
    np.testing.assert_allclose(adv, [-1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(zero, [False, False, True, True])  # group std still flags


def test_hand_scale_batch_uses_batch_std_and_group_mean():
    # batch [0, 2, 10, 10]: mean 5.5, unbiased var 83/3
    adv, _, zero = _adv([[0.0], [2.0], [10.0], [10.0]], [1.0], 2, scale="batch")
    s = math.sqrt(83 / 3)
    np.testing.assert_allclose(adv, [-1 / (s + EPS), 1 / (s + EPS), 0.0, 0.0], rtol=1e-6)
    assert not zero.any()


def test_hand_normalize_then_sum():
    # f0 in the group: [0, 2] -> +-1/(sqrt2 + eps); f1: [1, 1] has std 0 -> 0.
    # Summed: +-a; then centred and divided by the batch std of [-a, a] (= a*sqrt2) + eps.
    adv, rewards, zero = _adv(
        [[0.0, 1.0], [2.0, 1.0]], [1.0, 1.0], 2, aggregation="normalize_then_sum"
    )
    a = 1 / (math.sqrt(2) + EPS)
    expected = a / (a * math.sqrt(2) + EPS)
    np.testing.assert_allclose(adv, [-expected, expected], rtol=1e-6)
    np.testing.assert_allclose(rewards, [1.0, 3.0])  # raw weighted sum, for logging
    assert not zero.any()


@pytest.mark.parametrize("scale,aggregation", SETTINGS)
def test_group_size_one_gives_zero_advantages(scale, aggregation):
    # TRL: std of one sample is replaced by 0; each row is its own group mean.
    adv, _, zero = _adv([[1.0], [5.0], [nan]], [1.0], 1, scale, aggregation)
    np.testing.assert_array_equal(adv, [0.0, 0.0, 0.0])
    if scale in ("group", "none") and aggregation == "sum_then_normalize":
        assert zero.all()


@pytest.mark.parametrize("scale,aggregation", SETTINGS)
def test_all_none_batch(scale, aggregation):
    adv, rewards, zero = _adv(np.full((4, 2), nan), [1.0, 1.0], 2, scale, aggregation)
    np.testing.assert_array_equal(adv, np.zeros(4))
    assert np.isnan(rewards).all() and not zero.any()


# errors -------------------------------------------------------------------------------


def test_unknown_scale_names_field_value_and_choices():
    with pytest.raises(ValueError, match=r"scale='grp'.*\['group', 'batch', 'none'\]"):
        make_advantages(group_size=2, scale="grp")


def test_unknown_aggregation():
    with pytest.raises(ValueError, match=r"aggregation='mean'.*sum_then_normalize"):
        make_advantages(group_size=2, aggregation="mean")


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        make_advantages(group_size=group_size)


def test_shape_errors_show_shapes():
    fn = make_advantages(group_size=2)
    with pytest.raises(ValueError, match=r"rewards_per_func.shape=\(4, 2\).*weights.shape=\(3,\)"):
        fn(mx.zeros((4, 2)), mx.ones(3))
    with pytest.raises(ValueError, match=r"shape=\(4,\)"):
        fn(mx.zeros((4,)), mx.ones(1))
    with pytest.raises(ValueError, match=r"N=5.*group_size=2"):
        fn(mx.zeros((5, 1)), mx.ones(1))


# (b) properties ---------------------------------------------------------------------------


@given(reward_matrices(), st.sampled_from(SETTINGS))
def test_property_finite_and_zero_mean_per_group(case, setting):
    rpf, w, G = case
    adv, rewards, zero = _adv(rpf, w, G, *setting)
    assert np.isfinite(adv).all()  # NaN never leaks
    ok = _scorable(rpf)
    np.testing.assert_array_equal(adv[~ok], 0.0)
    assert np.isnan(rewards[~ok]).all() and not np.isnan(rewards[ok]).any()
    assert zero.dtype == bool and zero.shape == adv.shape
    for b in range(len(rpf) // G):
        rows = slice(b * G, (b + 1) * G)
        # |A| <= sqrt(G) for a z-score with unbiased std; sums cancel to float32 precision
        assert abs(adv[rows][ok[rows]].sum()) <= 1e-5 * G * max(1.0, np.abs(adv).max())


@st.composite
def uniform_group_batches(draw):
    """Batches where every group is uniform over its scorable rows (some rows all-None)."""
    G = draw(st.integers(1, 5))
    B = draw(st.integers(1, 4))
    F = draw(st.integers(1, 3))
    rows = []
    for _ in range(B):
        value = draw(st.floats(-5, 5, width=32))
        for _ in range(G):
            if draw(st.booleans()) and draw(st.booleans()):
                rows.append([nan] * F)
            else:
                rows.append([value] + [nan] * (F - 1))
    return np.array(rows, np.float32), np.ones(F, np.float32), G


@given(uniform_group_batches(), st.sampled_from(SETTINGS))
def test_property_uniform_groups_give_zero(case, setting):
    rpf, w, G = case
    adv, _, zero = _adv(rpf, w, G, *setting)
    np.testing.assert_allclose(adv, 0.0, atol=1e-6)
    if setting == ("group", "sum_then_normalize"):
        assert (adv == 0).all()  # exactly, thanks to the shifted mean
        ok = _scorable(rpf).reshape(-1, G)
        # flagged exactly when the group has >= 2 scorable rows (or G == 1)
        np.testing.assert_array_equal(
            zero.reshape(-1, G).all(axis=1), (ok.sum(axis=1) >= 2) | (G == 1)
        )


@pytest.mark.parametrize("scale,aggregation", SETTINGS)
@pytest.mark.parametrize("G", [2, 3])
def test_all_equal_batch_gives_zero(scale, aggregation, G):
    adv, _, _ = _adv(np.full((3 * G, 2), 0.7), [1.0, 0.5], G, scale, aggregation)
    np.testing.assert_array_equal(adv, 0.0)


@given(
    reward_matrices(min_group_size=2, elements=coarse_reward_values),
    st.data(),
    st.sampled_from(["group", "none"]),
)
def test_property_shift_invariance_per_group(case, data, scale):
    rpf, w, G = case
    assume(rpf.shape[1] == 1)  # a per-group shift of the one function shifts the reward
    shifts = np.repeat(
        data.draw(st.lists(st.integers(-20, 20), min_size=len(rpf) // G, max_size=len(rpf) // G)),
        G,
    ).astype(np.float32)
    a0, _, z0 = _adv(rpf, w, G, scale)
    a1, _, z1 = _adv(rpf + shifts[:, None], w, G, scale)
    np.testing.assert_allclose(a1, a0, atol=1e-4)
    np.testing.assert_array_equal(z1, z0)


@given(
    reward_matrices(min_group_size=2, elements=coarse_reward_values),
    st.sampled_from([0.25, 0.5, 3.0, 8.0]),
)
def test_property_scale_invariance_group(case, c):
    rpf, w, G = case
    a0, r0, z0 = _adv(rpf, w, G, "group")
    a1, _, z1 = _adv(rpf * c, w, G, "group")
    # Exact up to the epsilon: A(c r) = d / (s + eps / c) vs A(r) = d / (s + eps), so the gap
    # is at most (|d| / s) eps |1 - 1/c| / (s + eps / c) with |d| / s < sqrt(G).
    stds = [np_nanstd(g) for g in r0.reshape(-1, G).astype(np.float64)]
    s = min([x for x in stds if x > 0], default=1.0)
    tol = math.sqrt(G) * EPS * abs(1 - 1 / c) / (s + EPS / c) + 1e-5
    np.testing.assert_allclose(a1, a0, atol=tol)
    np.testing.assert_array_equal(z1, z0)


@given(reward_matrices(min_group_size=2))
def test_property_unit_unbiased_std_per_group(case):
    rpf, w, G = case
    adv, rewards, _ = _adv(rpf, w, G, "group")
    for b in range(len(rpf) // G):
        r = rewards[b * G : (b + 1) * G]
        a = adv[b * G : (b + 1) * G][~np.isnan(r)]
        r = r[~np.isnan(r)].astype(np.float64)
        if len(r) < 2 or r.std() == 0:
            continue
        s = r.std(ddof=1)
        # std(A) = s / (s + eps), i.e. 1 up to the epsilon
        assert abs(a.std(ddof=1) - 1) <= EPS / s + 1e-4


# (c) NumPy reference and compile --------------------------------------------------------


def _random_rewards(rng, B, G, F):
    rpf = rng.standard_normal((B * G, F)).astype(np.float32)
    rpf[rng.random((B * G, F)) < 0.25] = np.nan  # "not applicable"
    rpf[rng.random(B * G) < 0.15] = np.nan  # unscorable rows
    rpf[:G] = rng.choice([0.0, 1.0])  # a uniform group
    rpf[G : 2 * G] = np.round(rpf[G : 2 * G])  # ties
    return rpf, rng.uniform(0.1, 2.0, F).astype(np.float32)


@pytest.mark.parametrize("scale,aggregation", SETTINGS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_numpy_reference(scale, aggregation, seed):
    rng = np.random.default_rng(seed)
    G = int(rng.integers(1, 7))
    rpf, w = _random_rewards(rng, int(rng.integers(2, 6)), G, int(rng.integers(1, 4)))
    adv, rewards, zero = _adv(rpf, w, G, scale, aggregation)
    ref_adv, ref_rewards, ref_zero = np_advantages(rpf, w, G, scale, aggregation)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(rewards, ref_rewards, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(zero, ref_zero)


@given(reward_matrices(), st.sampled_from(SETTINGS))
def test_property_matches_numpy_reference(case, setting):
    rpf, w, G = case
    adv, rewards, _ = _adv(rpf, w, G, *setting)
    ref_adv, ref_rewards, _ = np_advantages(rpf, w, G, *setting)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(rewards, ref_rewards, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale,aggregation", SETTINGS)
def test_compiled_equals_uncompiled_and_traces_once(scale, aggregation):
    traces = 0
    fn = make_advantages(group_size=3, scale=scale, aggregation=aggregation)

    def counted(rpf, w):
        nonlocal traces
        traces += 1
        return fn(rpf, w)

    compiled = mx.compile(counted)
    for seed in range(3):
        rpf, w = _random_rewards(np.random.default_rng(seed), 4, 3, 2)
        got = compiled(mx.array(rpf), mx.array(w))
        want = fn(mx.array(rpf), mx.array(w))
        assert isinstance(got, Advantages)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, equal_nan=True)
    assert traces == 1  # traced once, reused for every later call of the same shape
