import math  # noqa: I001  (grpo must be imported before mlx)

import grpo  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given
from reference_numpy import np_entropy, np_token_logprobs
from strategies import logits_and_tokens

from grpo.core.logprobs import token_logprobs, token_logprobs_and_entropy

TEMPS = [0.5, 1.0, 1.7]


def _random(shape, V, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape + (V,)) * scale).astype(np.float32)
    tokens = rng.integers(0, V, size=shape).astype(np.int32)
    return logits, tokens


# (a) hand-computed -------------------------------------------------------------------


def test_hand_computed_two_token_vocab():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = mx.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    tokens = mx.array([1, 1])
    logp, ent = token_logprobs_and_entropy(logits, tokens)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(np.array(logp), [math.log(0.75), math.log(0.25)], rtol=1e-6)
    np.testing.assert_allclose(np.array(ent), [h, h], rtol=1e-6)


def test_hand_computed_temperature():
    # logits / 2 = [0, ln 3] again
    logits = mx.array([[0.0, 2 * math.log(3.0)]])
    logp = token_logprobs(logits, mx.array([0]), temperature=2.0)
    np.testing.assert_allclose(np.array(logp), [math.log(0.25)], rtol=1e-6)


def test_uniform_logits_entropy_is_log_v():
    V = 7
    _, ent = token_logprobs_and_entropy(mx.zeros((3, V)), mx.zeros((3,), mx.int32))
    np.testing.assert_allclose(np.array(ent), [math.log(V)] * 3, rtol=1e-6)


# (c) NumPy reference ----------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_matches_numpy_log_softmax_gather(temperature, lead):
    logits, tokens = _random(lead + (5,), 11, seed=len(lead))
    got = token_logprobs(mx.array(logits), mx.array(tokens), temperature=temperature)
    assert got.shape == tokens.shape and got.dtype == mx.float32
    np.testing.assert_allclose(
        np.array(got), np_token_logprobs(logits, tokens, temperature), atol=1e-5
    )


@pytest.mark.parametrize("temperature", TEMPS)
def test_entropy_matches_numpy(temperature):
    logits, tokens = _random((2, 6), 13, seed=3)
    logp, ent = token_logprobs_and_entropy(
        mx.array(logits), mx.array(tokens), temperature=temperature
    )
    np.testing.assert_allclose(np.array(ent), np_entropy(logits, temperature), atol=1e-5)
    np.testing.assert_allclose(
        np.array(logp), np_token_logprobs(logits, tokens, temperature), atol=1e-5
    )


@given(logits_and_tokens())
def test_property_matches_numpy(case):
    logits, tokens, temperature = case
    logp, ent = token_logprobs_and_entropy(
        mx.array(logits), mx.array(tokens), temperature=temperature
    )
    np.testing.assert_allclose(
        np.array(logp), np_token_logprobs(logits, tokens, temperature), atol=1e-5
    )
    np.testing.assert_allclose(np.array(ent), np_entropy(logits, temperature), atol=1e-5)
    # log-probs are <= 0 and the entropy lies in [0, log V]
    assert (np.array(logp) <= 1e-6).all()
    assert (np.array(ent) >= -1e-6).all() and (
        np.array(ent) <= math.log(logits.shape[-1]) + 1e-5
    ).all()


def test_bfloat16_logits_reduce_in_float32():
    logits, tokens = _random((2, 4), 50, seed=5)
    lb = mx.array(logits).astype(mx.bfloat16)
    got = token_logprobs(lb, mx.array(tokens), temperature=0.7)
    assert got.dtype == mx.float32
    ref = np_token_logprobs(np.array(lb.astype(mx.float32)), tokens, 0.7)
    np.testing.assert_allclose(np.array(got), ref, atol=1e-5)


# chunked path -------------------------------------------------------------------------


@pytest.mark.parametrize("max_chunk_elements", [1, 7, 40, 130, 10_000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_equals_unchunked(max_chunk_elements, temperature):
    # 40 < T*V = 60 forces row-by-row slices of T; 130 groups whole rows; 1 and 7 give
    # one token per chunk; 10_000 takes the unchunked path.
    big, tokens = _random((3, 8), 10, seed=7)
    logits = mx.array(big)[:, 1:7]  # a T-slice of a bigger array, like a model's output
    tokens = mx.array(tokens[:, :6])
    ref = token_logprobs_and_entropy(logits, tokens, temperature=temperature)
    got = token_logprobs_and_entropy(
        logits, tokens, temperature=temperature, max_chunk_elements=max_chunk_elements
    )
    got_lp = token_logprobs(
        logits, tokens, temperature=temperature, max_chunk_elements=max_chunk_elements
    )
    np.testing.assert_array_equal(np.array(got[0]), np.array(ref[0]))
    np.testing.assert_array_equal(np.array(got[1]), np.array(ref[1]))
    np.testing.assert_array_equal(np.array(got_lp), np.array(ref[0]))
    np.testing.assert_allclose(
        np.array(got[0]),
        np_token_logprobs(np.array(logits), np.array(tokens), temperature),
        atol=1e-5,
    )


def test_chunked_with_several_leading_dims():
    logits, tokens = _random((2, 3, 5), 6, seed=8)
    got = token_logprobs(mx.array(logits), mx.array(tokens), max_chunk_elements=12)
    assert got.shape == (2, 3, 5)
    np.testing.assert_allclose(np.array(got), np_token_logprobs(logits, tokens), atol=1e-5)


# gradients ----------------------------------------------------------------------------


def _reference_loss(logits, tokens, weights, temperature):
    # the plain mx.log_softmax formulation the chunked one must agree with
    logp_all = nn.log_softmax(logits / temperature, axis=-1)
    logp = mx.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    ent = -(mx.exp(logp_all) * logp_all).sum(-1)
    return (weights * logp).sum() + 0.3 * ent.sum()


@pytest.mark.parametrize("max_chunk_elements", [10_000, 13])
def test_gradient_matches_log_softmax_gradient(max_chunk_elements):
    big, tok = _random((2, 5), 9, seed=11)
    logits, tokens = mx.array(big), mx.array(tok)
    weights = mx.array(np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32))

    def loss(x):
        lp, ent = token_logprobs_and_entropy(
            x, tokens, temperature=0.8, max_chunk_elements=max_chunk_elements
        )
        return (weights * lp).sum() + 0.3 * ent.sum()

    g = mx.grad(loss)(logits)
    g_ref = mx.grad(lambda x: _reference_loss(x, tokens, weights, 0.8))(logits)
    np.testing.assert_allclose(np.array(g), np.array(g_ref), atol=1e-5)


def test_gradient_matches_finite_differences():
    logits, tokens = _random((3,), 4, seed=12, scale=1.0)
    tok = mx.array(tokens)
    w = np.array([0.5, -1.0, 2.0])

    def f64(x):
        return float((w * np_token_logprobs(x, tokens, 1.3)).sum())

    g = mx.grad(
        lambda x: (mx.array(w, mx.float32) * token_logprobs(x, tok, temperature=1.3)).sum()
    )(mx.array(logits))
    x0 = logits.astype(np.float64)
    fd = np.zeros_like(x0)
    h = 1e-5
    for idx in np.ndindex(x0.shape):
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += h
        xm[idx] -= h
        fd[idx] = (f64(xp) - f64(xm)) / (2 * h)
    np.testing.assert_allclose(np.array(g), fd, atol=1e-4)


# compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_chunk_elements", [10_000, 9])
def test_compiled_equals_uncompiled(max_chunk_elements):
    logits, tokens = mx.array(_random((2, 4), 8, seed=13)[0]), mx.array(_random((2, 4), 8, 13)[1])

    def f(x, t):
        return token_logprobs_and_entropy(
            x, t, temperature=0.9, max_chunk_elements=max_chunk_elements
        )

    def loss(x, t):
        lp, ent = f(x, t)
        return lp.sum() - ent.mean()

    lp, ent = mx.compile(f)(logits, tokens)
    lp0, ent0 = f(logits, tokens)
    np.testing.assert_allclose(np.array(lp), np.array(lp0), atol=1e-6)
    np.testing.assert_allclose(np.array(ent), np.array(ent0), atol=1e-6)
    v, g = mx.compile(mx.value_and_grad(loss))(logits, tokens)
    v0, g0 = mx.value_and_grad(loss)(logits, tokens)
    np.testing.assert_allclose(float(v), float(v0), rtol=1e-6)
    np.testing.assert_allclose(np.array(g), np.array(g0), atol=1e-6)


# errors -------------------------------------------------------------------------------


def test_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"logits.shape=\(2, 3, 5\).*tokens.shape=\(2, 4\)"):
        token_logprobs(mx.zeros((2, 3, 5)), mx.zeros((2, 4), mx.int32))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(
            mx.zeros((2, 5)), mx.zeros((2,), mx.int32), temperature=temperature
        )


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="max_chunk_elements"):
        token_logprobs(mx.zeros((2, 5)), mx.zeros((2,), mx.int32), max_chunk_elements=0)


# memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [token_logprobs, token_logprobs_and_entropy])
def test_chunked_peak_memory_below_float32_logits(fn, peak_extra_bytes):
    B, T, V = 2, 64, 32768
    f32_bytes = B * T * V * 4  # 16 MiB
    key = mx.random.key(0)
    # bf16 logits as a T-slice of a bigger array, the way a model's output arrives.
    full = (mx.random.normal((B, T + 3, V), key=key) * 3).astype(mx.bfloat16)
    logits = full[:, 2 : T + 2]
    tokens = mx.random.randint(0, V, (B, T), key=mx.random.key(1))
    mx.eval(full, tokens)

    chunked = peak_extra_bytes(
        lambda: fn(logits, tokens, temperature=0.7, max_chunk_elements=1 << 16)
    )
    unchunked = peak_extra_bytes(
        lambda: fn(logits, tokens, temperature=0.7, max_chunk_elements=1 << 30)
    )
    # The measurement can see a full float32 copy (the unchunked path makes one) ...
    assert unchunked >= f32_bytes
    # ... and the chunked path stays far below it.
    assert chunked < f32_bytes / 4, (chunked, f32_bytes)
