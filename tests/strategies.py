"""Shared hypothesis strategies: bounded float32 arrays for the GRPO maths."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

finite = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False, width=32)


def arrays(shape, elements=finite):
    return hnp.arrays(np.float32, shape, elements=elements)


@st.composite
def group_shapes(draw, max_groups=4, max_group_size=6):
    """(num_groups, group_size) with group_size >= 2."""
    return draw(st.integers(1, max_groups)), draw(st.integers(2, max_group_size))


# --- core-math: rewards and logits -----------------------------------------------------

# Rewards as scorers produce them: ties from a few discrete values, continuous values, NaN.
reward_values = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0]),
    st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False, width=32),
    st.just(float("nan")),
)
# Coarse rewards (multiples of 0.5): any non-uniform group has std >= ~0.2, which keeps the
# 1e-4 epsilon's effect bounded in scale-invariance and unit-std properties.
coarse_reward_values = st.one_of(
    st.integers(-8, 8).map(lambda k: 0.5 * k),
    st.just(float("nan")),
)


@st.composite
def reward_matrices(
    draw, max_groups=4, min_group_size=1, max_group_size=6, max_funcs=3, elements=reward_values
):
    """(rewards_per_func [N, F] float32 with NaN, weights [F] float32, group_size)."""
    g = draw(st.integers(min_group_size, max_group_size))
    b = draw(st.integers(1, max_groups))
    f = draw(st.integers(1, max_funcs))
    rpf = draw(hnp.arrays(np.float32, (b * g, f), elements=elements))
    weights = draw(hnp.arrays(np.float32, (f,), elements=st.floats(0.125, 2.0, width=32)))
    return rpf, weights, g


@st.composite
def logits_and_tokens(draw, max_lead=2, max_tokens=5, max_vocab=9):
    """(logits [*lead, T, V] float32, tokens [*lead, T] int32, temperature)."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_lead)))
    t = draw(st.integers(1, max_tokens))
    v = draw(st.integers(2, max_vocab))
    logits = draw(arrays(lead + (t, v), st.floats(-8.0, 8.0, width=32)))
    tokens = draw(hnp.arrays(np.int32, lead + (t,), elements=st.integers(0, v - 1)))
    temperature = draw(st.sampled_from([0.5, 1.0, 1.7]))
    return logits, tokens, temperature


# -- policy loss (loss helper) -------------------------------------------------------------
# `small_logp` above has bound -0.01, which is not a float32, so hypothesis refuses it; this
# variant of `token_batches` uses exactly representable bounds.
policy_logp = st.floats(-8.0, -0.0625, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def policy_batches(draw, max_rows=6, max_tokens=7):
    """(logprobs, old_logprobs, ref_logprobs, advantages, mask) float32, >= 1 live token per row."""
    n = draw(st.integers(1, max_rows))
    t = draw(st.integers(1, max_tokens))
    logp = draw(arrays((n, t), policy_logp))
    old = logp + draw(arrays((n, t), st.floats(-0.5, 0.5, width=32)))
    ref = logp + draw(arrays((n, t), st.floats(-1.0, 1.0, width=32)))
    adv = draw(arrays((n,), st.floats(-3.0, 3.0, width=32)))
    mask = draw(arrays((n, t), st.sampled_from([0.0, 1.0])))
    mask[:, 0] = 1.0
    return logp, old.astype(np.float32), ref.astype(np.float32), adv, mask


# -- sampler-mismatch correction (importance) ---------------------------------------------


@st.composite
def sampler_batches(draw, max_rows=5, max_tokens=6):
    """(old [N, T], sampling [N, T] with NaN, mask [N, T], mode, clip_min, clip_max).

    ``sampling`` is ``old`` plus a bounded mismatch (a quantized sampler's), NaN where the
    sampler could not score a token; the bounds are ones GRPOConfig accepts.
    """
    n = draw(st.integers(1, max_rows))
    t = draw(st.integers(1, max_tokens))
    old = draw(arrays((n, t), policy_logp))
    samp = old + draw(arrays((n, t), st.floats(-1.5, 1.5, width=32)))
    nan = draw(arrays((n, t), st.sampled_from([0.0, 0.0, 0.0, 1.0])))
    samp = np.where(nan > 0, np.nan, samp).astype(np.float32)
    mask = draw(arrays((n, t), st.sampled_from([0.0, 1.0])))
    mode = draw(st.sampled_from(("token_truncate", "token_mask", "sequence_truncate",
                                 "sequence_mask")))  # fmt: skip
    lo = draw(st.sampled_from([None, 0.25, 0.5, 0.8]))
    hi = draw(st.sampled_from([None, 1.25, 2.0, 3.0]))
    if mode.endswith("truncate") and lo is None and hi is None:
        hi = 3.0
    return old, samp, mask, mode, lo, hi
