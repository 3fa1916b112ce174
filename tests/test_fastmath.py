"""grpo.core.fastmath, the inverse-CDF sampler and the CPU attention kernel against references."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.core import fastmath
from grpo.core.sampling import draw
from grpo.io.fast_attention import attention
from tests.strategies import arrays


def test_runs_on_the_cpu_device():
    # Everything below exercises the polynomial path only if this holds.
    assert fastmath.on_cpu()


def test_exp_relative_error_over_the_float32_range():
    x = np.linspace(-87.3, 88.3, 2_000_001, dtype=np.float32)
    got = np.array(fastmath.exp(mx.array(x))).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2e-7


def test_exp_and_sigmoid_special_values():
    x = mx.array([-np.inf, np.inf, np.nan, -1000.0, 1000.0, -87.5, 0.0], mx.float32)
    e = np.array(fastmath.exp(x))
    assert e[0] == 0 and e[1] == np.inf and np.isnan(e[2]) and e[3] == 0 and e[4] == np.inf
    assert e[5] == 0 and e[6] == 1
    s = np.array(fastmath.sigmoid(x))
    np.testing.assert_array_equal(s[[0, 1, 3, 4, 6]], [0.0, 1.0, 0.0, 1.0, 0.5])
    assert np.isnan(s[2])


@settings(max_examples=30)
@given(x=arrays((3, 17), elements=st.floats(-60, 60, width=32)))
def test_sigmoid_silu_softmax_logsumexp_match_float64(x):
    z = mx.array(x)
    x64 = x.astype(np.float64)
    sig = 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(np.array(fastmath.sigmoid(z)), sig, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(np.array(fastmath.silu(z)), x64 * sig, rtol=1e-6, atol=1e-30)
    p = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(
        np.array(fastmath.softmax(z)), p / p.sum(-1, keepdims=True), rtol=1e-5, atol=1e-30
    )
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    np.testing.assert_allclose(np.array(fastmath.logsumexp(z)), lse, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(fastmath.logsumexp(z, axis=0, keepdims=True))[0],
                               np.log(np.exp(x64).sum(0)), rtol=1e-6, atol=1e-6)  # fmt: skip


def test_masked_rows_behave_like_mlx():
    z = mx.array([[-np.inf, -np.inf], [0.0, -np.inf], [np.inf, 0.0]])
    np.testing.assert_array_equal(
        np.array(fastmath.logsumexp(z)), np.array(mx.logsumexp(z, axis=-1))
    )
    s = np.array(fastmath.softmax(z))
    np.testing.assert_array_equal(s[1], [1.0, 0.0])
    assert np.isnan(s[0]).all() == np.isnan(np.array(mx.softmax(z, axis=-1))[0]).all()


@pytest.mark.parametrize(
    "fast, ref",
    [
        (fastmath.exp, mx.exp),
        (fastmath.sigmoid, mx.sigmoid),
        (fastmath.silu, nn.silu),
        (fastmath.softmax, lambda x: mx.softmax(x, axis=-1, precise=True)),
        (fastmath.logsumexp, lambda x: mx.logsumexp(x, axis=-1)),
    ],
)
def test_gradients_match_mlx(fast, ref):
    x = mx.random.normal((4, 33), key=mx.random.key(3)) * 3
    w = mx.random.normal((4, 33), key=mx.random.key(4))

    def loss(f):
        return lambda x: (f(x) * (w if f(x).ndim == 2 else w[:, 0])).sum()

    got, want = mx.grad(loss(fast))(x), mx.grad(loss(ref))(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=2e-6)
    got = mx.grad(loss(fast))(mx.array([[-200.0] * 33] * 4))  # saturated: finite, not nan
    assert np.isfinite(np.array(got)).all()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x = mx.random.normal((2, 9), key=mx.random.key(0)).astype(dtype)
    for f in (fastmath.exp, fastmath.sigmoid, fastmath.silu, fastmath.softmax):
        assert f(x).dtype == dtype
    assert fastmath.logsumexp(x).dtype == mx.float32


def test_compiled_exp_is_the_same_function():
    x = mx.random.normal((5, 40), key=mx.random.key(1)) * 10
    np.testing.assert_array_equal(np.array(mx.compile(fastmath.exp)(x)), np.array(fastmath.exp(x)))


# -- the inverse-CDF sampler ---------------------------------------------------------------


def test_draw_follows_the_softmax_distribution():
    logits = np.array([0.0, 1.0, 2.0, -np.inf, 0.5, -1.0], np.float32)
    n = 40_000
    tokens, lse = draw(mx.array(np.tile(logits, (n, 1))), mx.random.key(7))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    counts = np.bincount(np.array(tokens), minlength=len(p))
    assert counts[3] == 0
    # Chi-square goodness of fit over the 5 possible tokens (4 dof; 0.1% critical value 18.5).
    ok = p > 0
    chi2 = (((counts[ok] - n * p[ok]) ** 2) / (n * p[ok])).sum()
    assert chi2 < 18.5, (counts, n * p)
    np.testing.assert_allclose(
        np.array(lse)[:, 0], np.log(np.exp(logits[ok].astype(np.float64)).sum()), rtol=1e-6
    )


@settings(max_examples=40)
@given(
    x=arrays((4, 11), elements=st.floats(-30, 30, width=32)),
    masked=arrays((4, 11), elements=st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_draw_never_picks_a_masked_token(x, masked, seed):
    masked[:, 0] = False  # every row keeps a finite logit
    z = np.where(masked, -np.inf, x).astype(np.float32)
    tokens, _ = draw(mx.array(z), mx.random.key(seed))
    tokens = np.array(tokens)
    assert ((tokens >= 0) & (tokens < 11)).all()
    assert not masked[np.arange(4), tokens].any()


def test_draw_is_deterministic_in_the_key():
    z = mx.random.normal((8, 50), key=mx.random.key(0))
    a, b = draw(z, mx.random.key(1))[0], draw(z, mx.random.key(1))[0]
    c = draw(z, mx.random.key(2))[0]
    assert (np.array(a) == np.array(b)).all() and not (np.array(a) == np.array(c)).all()


# -- attention -------------------------------------------------------------------------------


def _masks(B, Hq, L, S, key):
    bool_mask = mx.random.bernoulli(0.7, (B, 1, L, S), key=key)
    bool_mask[..., -1] = True  # no fully masked row in the additive variant
    return {
        "none": None,
        "causal": "causal",
        "bool": bool_mask,
        "bool_per_head": mx.random.bernoulli(0.7, (B, Hq, L, S), key=key),
        "bool_2d": mx.random.bernoulli(0.7, (L, S), key=key),
        "additive": mx.where(bool_mask, 0.0, -mx.inf),
    }


@pytest.mark.parametrize(
    "mask_kind", ["none", "causal", "bool", "bool_per_head", "bool_2d", "additive"]
)
@pytest.mark.parametrize("L, S", [(1, 9), (5, 5), (4, 13)])
@pytest.mark.parametrize("Hq, Hkv", [(2, 2), (4, 2), (4, 1)])
def test_attention_matches_mlx_sdpa(mask_kind, L, S, Hq, Hkv):
    k1, k2, k3, k4 = mx.random.split(mx.random.key(L * 100 + S * 10 + Hq + Hkv), 4)
    q = mx.random.normal((2, Hq, L, 8), key=k1)
    k = mx.random.normal((2, Hkv, S, 8), key=k2)
    v = mx.random.normal((2, Hkv, S, 8), key=k3)
    mask = _masks(2, Hq, L, S, k4)[mask_kind]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.4, mask=mask)
    got = attention(q, k, v, scale=0.4, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5)

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * mx.arange(8)).sum()

    sdpa = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.4, mask=mask)  # noqa: E731
    ours = lambda q, k, v: attention(q, k, v, scale=0.4, mask=mask)  # noqa: E731
    for a, b in zip(mx.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
                    mx.grad(loss(sdpa), argnums=(0, 1, 2))(q, k, v), strict=True):  # fmt: skip
        np.testing.assert_allclose(np.array(a), np.array(b), atol=5e-5)


def test_attention_rejects_an_unknown_mask_string():
    x = mx.zeros((1, 1, 2, 4))
    with pytest.raises(ValueError, match="mask"):
        attention(x, x, x, scale=1.0, mask="sliding")
