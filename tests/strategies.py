"""Shared hypothesis strategies: bounded float32 arrays for the GRPO maths."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

finite = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False, width=32)
small_logp = st.floats(-8.0, -0.01, allow_nan=False, allow_infinity=False, width=32)


def arrays(shape, elements=finite):
    return hnp.arrays(np.float32, shape, elements=elements)


@st.composite
def group_shapes(draw, max_groups=4, max_group_size=6):
    """(num_groups, group_size) with group_size >= 2."""
    return draw(st.integers(1, max_groups)), draw(st.integers(2, max_group_size))


@st.composite
def token_batches(draw, max_rows=6, max_tokens=7):
    """(logprobs, old_logprobs, ref_logprobs, advantages, mask) with >= 1 live token per row."""
    n = draw(st.integers(1, max_rows))
    t = draw(st.integers(1, max_tokens))
    logp = draw(arrays((n, t), small_logp))
    old = logp + draw(arrays((n, t), st.floats(-0.5, 0.5, width=32)))
    ref = logp + draw(arrays((n, t), st.floats(-1.0, 1.0, width=32)))
    adv = draw(arrays((n,), st.floats(-3.0, 3.0, width=32)))
    mask = draw(arrays((n, t), st.sampled_from([0.0, 1.0])))
    mask[:, 0] = 1.0
    return logp, old.astype(np.float32), ref.astype(np.float32), adv, mask
