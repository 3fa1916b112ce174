"""Policy loss: hand cases, the NumPy re-derivation of TRL, and hypothesis properties."""

import math  # noqa: I001  (grpo must be imported before mlx)
import zlib

import attrs
import grpo  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference_numpy import np_grad_fd, np_kl_k3, np_policy_loss, np_quantile_mask
from strategies import arrays, policy_batches

from grpo.core.loss import (
    CLIPPED_LOSS_TYPES,
    LOSS_TYPES,
    LossConfig,
    high_entropy_mask,
    kl_k3,
    make_policy_loss,
    off_policy_mask,
    policy_loss,
)

# ------------------------------------------------------------------ helpers


def _call(cfg, logp, adv, mask, **optional):
    """value_and_grad of the MLX loss w.r.t. logprobs; returns numpy (loss, metrics, grad)."""
    fn = make_policy_loss(cfg)
    opt = {
        k: (None if v is None else mx.array(np.asarray(v, np.float32))) for k, v in optional.items()
    }

    def f(x):
        return fn(x, mx.array(adv, dtype=mx.float32), mx.array(mask, dtype=mx.float32), **opt)

    (loss, metrics), grad = mx.value_and_grad(f)(mx.array(logp, dtype=mx.float32))
    return loss.item(), {k: v.item() for k, v in metrics.items()}, np.array(grad)


def _reduction_weights(loss_type, mask, max_len=512):
    """d loss / d per_token_loss for each reduction (numpy, float64)."""
    mask = np.asarray(mask, np.float64)
    N, _ = mask.shape
    if loss_type in ("grpo", "sapo"):
        return mask / np.maximum(mask.sum(1, keepdims=True), 1) / N
    if loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        return mask / max(mask.sum(), 1)
    if loss_type == "dr_grpo":
        return mask / (N * max_len)
    if loss_type == "luspo":
        return mask / N
    raise AssertionError(loss_type)


# --------------------------------------------------------------- config


def test_config_defaults_follow_trl():
    cfg = LossConfig()
    assert (cfg.loss_type, cfg.importance_sampling_level) == ("dapo", "token")
    assert cfg.epsilon == 0.2 and cfg.epsilon_high == 0.2 and cfg.delta is None
    assert cfg.beta == 0.0 and cfg.use_bias_correction_kl is True
    assert (cfg.sapo_temperature_pos, cfg.sapo_temperature_neg) == (1.0, 1.05)
    assert (cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg) == (
        2.0,
        3.0,
        3.0,
        2.0,
    )
    assert LossConfig(epsilon=0.1, epsilon_high=0.28).epsilon_high == 0.28
    assert LossConfig(epsilon=0.3).epsilon_high == 0.3


@pytest.mark.parametrize(
    "field,value",
    [
        ("loss_type", "ppo"),
        ("importance_sampling_level", "batch"),
        ("epsilon", -0.1),
        ("epsilon_high", -1.0),
        ("delta", 0.5),
        ("beta", -0.01),
        ("top_entropy_quantile", 1.5),
        ("off_policy_mask_threshold", -1.0),
        ("entropy_coef", -0.1),
        ("max_completion_length", 0),
        ("sapo_temperature_neg", 0.0),
        ("vespo_lambda_pos", -1.0),
        ("epsilon", float("nan")),
        ("prompt_share", 0),
        ("head_chunk_elements", 0),
    ],
)
def test_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


def test_shape_errors_show_shapes():
    cfg = LossConfig()
    with pytest.raises(ValueError, match=r"advantages.shape=\(3,\)"):
        policy_loss(mx.zeros((2, 4)), mx.zeros(3), mx.ones((2, 4)), cfg=cfg)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(mx.zeros((2, 4)), mx.zeros(2), mx.ones((2, 4)), cfg=LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="entropies"):
        policy_loss(
            mx.zeros((2, 4)), mx.zeros(2), mx.ones((2, 4)), cfg=LossConfig(top_entropy_quantile=0.5)
        )


# ----------------------------------------------------------- hand-computed


def test_hand_computed_grpo_clipping():
    # Ratios 1.25 and 2.0 on both rows; eps = 0.2 clips both at 1.2.
    # Row A=+1: -min(r, 1.2) = -1.2 each -> -1.2.  Row A=-1: -min(-r, -1.2) = r -> 1.625.
    logp = np.log([[0.5, 0.5], [0.5, 0.5]])
    old = np.log([[0.4, 0.25], [0.4, 0.25]])
    loss, m, _ = _call(
        LossConfig(loss_type="grpo"), logp, [1.0, -1.0], np.ones((2, 2)), old_logprobs=old
    )
    assert loss == pytest.approx((-1.2 + 1.625) / 2, abs=1e-6)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.5)  # both tokens of row 0
    assert m["clip_ratio/low_mean"] == 0.0 and m["clip_ratio/high_max"] == 1.0
    # delta = 1.5 caps the unclipped ratio 2.0 of the A<0 row: (1.25 + 1.5) / 2.
    loss, _, _ = _call(
        LossConfig(loss_type="grpo", delta=1.5),
        logp,
        [1.0, -1.0],
        np.ones((2, 2)),
        old_logprobs=old,
    )
    assert loss == pytest.approx((-1.2 + 1.375) / 2, abs=1e-6)


def test_clip_extremes_skip_empty_rows():
    # Row 0 (A<0, ratio 0.5 < 0.8) is fully low-clipped; row 1 has no active token and must
    # be left out of the min (TRL's nanmin), not counted as 0.
    logp = np.log([[0.25, 0.25], [0.5, 0.5]])
    old = np.log([[0.5, 0.5], [0.5, 0.5]])
    mask = np.array([[1.0, 1.0], [0.0, 0.0]])
    _, m, _ = _call(LossConfig(loss_type="grpo"), logp, [-1.0, 1.0], mask, old_logprobs=old)
    assert m["clip_ratio/low_min"] == 1.0 and m["clip_ratio/high_max"] == 0.0
    _, m, _ = _call(LossConfig(loss_type="grpo"), logp, [-1.0, 1.0], mask * 0, old_logprobs=old)
    assert math.isnan(m["clip_ratio/low_min"]) and math.isnan(m["clip_ratio/high_max"])


def test_hand_computed_kl_and_reductions():
    # d = log 2: k3 = 2 - log 2 - 1.
    kl = kl_k3(mx.array([math.log(0.25)]), mx.array([math.log(0.5)]))
    assert kl.item() == pytest.approx(1 - math.log(2), abs=1e-6)
    # At ratio 1 with A = 1 every per-token loss is -1: the reductions differ only in scale.
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    logp = np.full((2, 4), -1.0)
    expected = {"grpo": -1.0, "bnpo": -1.0, "dapo": -1.0, "luspo": -2.0, "dr_grpo": -4 / (2 * 8)}
    for loss_type, value in expected.items():
        cfg = LossConfig(loss_type=loss_type, max_completion_length=8)
        assert _call(cfg, logp, [1.0, 1.0], mask)[0] == pytest.approx(value, abs=1e-6), loss_type
    dapo = LossConfig(loss_type="dapo")
    assert _call(dapo, logp, [1.0, 1.0], mask, num_items_in_batch=8.0)[0] == pytest.approx(-0.5)


def test_high_entropy_mask_hand_case():
    h = mx.array([[1.0, 2.0, 3.0, 9.0], [4.0, 0.5, 0.0, 0.0]])
    mask = mx.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=mx.float32)
    # Active entropies 0.5, 1, 2, 3, 4; the median is 2.
    expected = [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert np.array(high_entropy_mask(h, mask, quantile=0.5)).tolist() == expected
    assert np.array(high_entropy_mask(h, mask * 0, quantile=0.5)).sum() == 0


def test_off_policy_mask_hand_case():
    logp = mx.zeros((3, 2))
    old = mx.array([[0.9, 0.9], [0.1, 0.1], [0.9, 0.9]])
    adv = mx.array([[-1.0], [-1.0], [1.0]])
    keep = off_policy_mask(adv, logp, old, mx.ones((3, 2)), threshold=0.5)
    # Row 0: negative advantage and mean KL 0.9 > 0.5 -> dropped; others kept.
    assert np.array(keep)[:, 0].tolist() == [0.0, 1.0, 1.0]


# ---------------------------------------------------- NumPy reference check

CLIPPING = {
    "symmetric": dict(epsilon=0.2),
    "asymmetric": dict(epsilon=0.2, epsilon_high=0.28),
    "delta": dict(epsilon=0.2, epsilon_high=0.28, delta=1.3),
}
EXTRAS = {
    "plain": dict(),
    "kl": dict(beta=0.05, use_bias_correction_kl=True),
    "kl_unbiased_off": dict(beta=0.05, use_bias_correction_kl=False),
    "masks_bonus": dict(
        top_entropy_quantile=0.4, off_policy_mask_threshold=0.05, entropy_coef=0.01
    ),
}


def _random_inputs(seed, ragged):
    rng = np.random.default_rng(seed)
    N, T = 5, 6
    logp = rng.uniform(-4.0, -0.05, (N, T))
    old = logp + rng.uniform(-0.5, 0.5, (N, T))
    ref = logp + rng.uniform(-1.0, 1.0, (N, T))
    ent = rng.uniform(0.0, 3.0, (N, T))
    adv = rng.normal(size=N)
    adv[2] = 0.0  # A = 0 picks the "pos" side of vespo's Gamma weights, "neg" of SAPO's gate
    if ragged:
        lengths = np.array([6, 3, 1, 0, 4])
        mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    else:
        mask = np.ones((N, T))
    # Round-trip through float32 so both sides see identical inputs.
    f32 = lambda x: np.asarray(x, np.float32).astype(np.float64)  # noqa: E731
    return f32(logp), f32(old), f32(ref), f32(ent), f32(adv), mask


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("clipping", list(CLIPPING))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_numpy_reference(loss_type, level, clipping, ragged, extras):
    kw = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=8)
    cfg = LossConfig(**kw, **CLIPPING[clipping], **EXTRAS[extras])
    seed = zlib.crc32(f"{loss_type}/{level}/{clipping}/{ragged}/{extras}".encode())
    logp, old, ref, ent, adv, mask = _random_inputs(seed, ragged)
    num_items = 23.0 if loss_type in ("dapo", "cispo", "vespo") else None
    opt = dict(old_logprobs=old, ref_logprobs=ref, entropies=ent)
    loss, metrics, grad = _call(cfg, logp, adv, mask, **opt, num_items_in_batch=num_items)

    def ref_fn(x):
        return np_policy_loss(
            x, adv, mask, cfg, old=old, ref=ref, entropies=ent, num_items=num_items, logp_sg=logp
        )

    ref_loss, ref_metrics = ref_fn(logp)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    fd = np_grad_fd(lambda x: ref_fn(x)[0], logp)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_default_old_logprobs_is_detached_current(loss_type):
    # old = None must behave as old = stop_gradient(logp): compare with the reference given logp.
    logp, _, ref, ent, adv, mask = _random_inputs(7, ragged=True)
    cfg = LossConfig(loss_type=loss_type, beta=0.04, epsilon_high=1.5)
    loss, metrics, grad = _call(cfg, logp, adv, mask, ref_logprobs=ref, entropies=ent)

    def ref_fn(x):
        return np_policy_loss(x, adv, mask, cfg, ref=ref, entropies=ent, logp_sg=logp)

    np.testing.assert_allclose(loss, ref_fn(logp)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, np_grad_fd(lambda x: ref_fn(x)[0], logp), rtol=1e-4, atol=1e-4)


def test_entropy_coef_override_and_bonus_gradient():
    logp, old, _, ent, adv, mask = _random_inputs(3, ragged=True)
    cfg = LossConfig(loss_type="grpo", top_entropy_quantile=0.5)
    fn = make_policy_loss(cfg)
    args = [mx.array(x, dtype=mx.float32) for x in (logp, adv, mask, old)]

    def f(h, coef):
        return fn(*args[:3], old_logprobs=args[3], entropies=h, entropy_coef=coef)[0]

    h = mx.array(ent, dtype=mx.float32)
    loss, grad_h = mx.value_and_grad(f)(h, mx.array(0.3))
    ref, _ = np_policy_loss(logp, adv, mask, cfg, old=old, entropies=ent, entropy_coef=0.3)
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5, atol=1e-6)
    # d/dH of -c * mean_{effective}(H): -c / |effective| on kept tokens, 0 elsewhere.
    keep = np_quantile_mask(ent, mask, 0.5).astype(np.float64)
    np.testing.assert_allclose(np.array(grad_h), -0.3 * keep / keep.sum(), atol=1e-7)


# ------------------------------------------------------------ properties


@given(arrays((4, 5), st.floats(-6, 0, width=32)), arrays((4, 5), st.floats(-6, 0, width=32)))
def test_kl_nonnegative_and_zero_iff_equal(logp, ref):
    kl = np.array(kl_k3(mx.array(logp), mx.array(ref)))
    assert (kl >= 0).all()
    assert (kl[logp == ref] == 0).all()
    # float32 cannot resolve k3 ~ d^2/2 for |d| << 1e-3, so "iff" is checked above that.
    assert (kl[np.abs(logp - ref) > 1e-3] > 0).all()
    np.testing.assert_allclose(kl, np_kl_k3(logp, ref), rtol=1e-4, atol=1e-6)


@given(policy_batches(), st.sampled_from(CLIPPED_LOSS_TYPES), st.sampled_from([None, 1.4]))
def test_clip_gradient_invariants(batch, loss_type, delta):
    logp, old, _, adv, mask = batch
    cfg = LossConfig(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, delta=delta)
    _, _, grad = _call(cfg, logp, adv, mask, old_logprobs=old)
    r = np.exp(logp.astype(np.float64) - old)
    A = np.broadcast_to(adv[:, None], r.shape).astype(np.float64)
    w = _reduction_weights(loss_type, mask)
    high = (r > 1 + cfg.epsilon_high) & (A > 0)
    low = (r < 1 - cfg.epsilon) & (A < 0)
    above_delta = (r > delta) if delta is not None else np.zeros_like(high)
    inside = (r > 1 - cfg.epsilon + 1e-4) & (r < 1 + cfg.epsilon_high - 1e-4) & ~above_delta
    # Away from the kinks (float32 ratios), inside tokens get the plain -A r w gradient ...
    np.testing.assert_allclose(grad[inside], (-A * r * w)[inside], rtol=1e-4, atol=1e-6)
    # ... and tokens clipped in the direction the advantage pushes get none.
    far = (np.abs(r - (1 + cfg.epsilon_high)) > 1e-4) & (np.abs(r - (1 - cfg.epsilon)) > 1e-4)
    assert np.all(grad[(high | low) & far] == 0)


@given(policy_batches(), st.sampled_from(CLIPPED_LOSS_TYPES), st.sampled_from([0.0, 0.1]))
def test_first_iteration_equals_reduction_of_minus_a_plus_kl(batch, loss_type, beta):
    logp, _, ref, adv, mask = batch
    cfg = LossConfig(loss_type=loss_type, beta=beta, max_completion_length=7)
    loss, _, _ = _call(cfg, logp, adv, mask, ref_logprobs=ref)
    per_token = -adv[:, None].astype(np.float64) + beta * np_kl_k3(logp, ref)
    w = _reduction_weights(loss_type, mask, max_len=7)
    assert loss == pytest.approx((per_token * w).sum(), rel=1e-4, abs=1e-5)


@given(
    policy_batches(),
    arrays((6,), st.floats(-0.375, 0.375, width=32)),
    st.sampled_from(LOSS_TYPES),
)
def test_gspo_equal_token_ratios_matches_token_level(batch, shift, loss_type):
    logp, _, ref, adv, mask = batch
    old = (logp - shift[: logp.shape[0], None]).astype(np.float32)
    tok = LossConfig(loss_type=loss_type, epsilon_high=1.5, beta=0.02)
    seq = attrs.evolve(tok, importance_sampling_level="sequence")
    a, _, _ = _call(tok, logp, adv, mask, old_logprobs=old, ref_logprobs=ref)
    b, _, _ = _call(seq, logp, adv, mask, old_logprobs=old, ref_logprobs=ref)
    # The sequence mean equals each token's log-ratio only up to float32 rounding.
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


@given(policy_batches(), st.sampled_from(LOSS_TYPES), st.integers(0, 2**31 - 1))
def test_masked_positions_change_nothing(batch, loss_type, seed):
    logp, old, ref, adv, mask = batch
    rng = np.random.default_rng(seed)
    ent = rng.uniform(0, 3, logp.shape)
    cfg = LossConfig(
        loss_type=loss_type,
        beta=0.05,
        top_entropy_quantile=0.5,
        entropy_coef=0.01,
        off_policy_mask_threshold=0.1,
    )
    off = mask == 0

    def scramble(x, lo, hi):
        y = np.array(x, np.float64)
        y[off] = rng.uniform(lo, hi, off.sum())
        return y

    base = _call(cfg, logp, adv, mask, old_logprobs=old, ref_logprobs=ref, entropies=ent)
    other = _call(
        cfg,
        scramble(logp, -20, 0),
        adv,
        mask,
        old_logprobs=scramble(old, -20, 0),
        ref_logprobs=scramble(ref, -20, 0),
        entropies=scramble(ent, 0, 50),
    )
    assert base[0] == pytest.approx(other[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(base[2], other[2], rtol=1e-5, atol=1e-7)
    assert np.all(base[2][off] == 0)


@given(policy_batches(), st.sampled_from(LOSS_TYPES))
def test_on_policy_gradient_is_minus_advantage(batch, loss_type):
    logp, _, _, adv, mask = batch
    cfg = LossConfig(loss_type=loss_type, epsilon_high=5.0, max_completion_length=7)
    _, _, grad = _call(cfg, logp, adv, mask)
    w = _reduction_weights(loss_type, mask, max_len=7)
    np.testing.assert_allclose(grad, -adv[:, None] * w, rtol=1e-5, atol=1e-7)


@given(policy_batches(), st.sampled_from(LOSS_TYPES), st.sampled_from(["token", "sequence"]))
def test_compiled_equals_uncompiled(batch, loss_type, level):
    logp, old, ref, adv, mask = batch
    ent = -logp
    cfg = LossConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.03,
        top_entropy_quantile=0.6,
        entropy_coef=0.02,
        off_policy_mask_threshold=0.2,
    )
    fn = make_policy_loss(cfg)

    def f(x, a, m, o, r, h):
        return fn(x, a, m, old_logprobs=o, ref_logprobs=r, entropies=h)

    args = [mx.array(x) for x in (logp, adv, mask, old, ref, ent)]
    eager = mx.value_and_grad(f)(*args)
    compiled = mx.compile(mx.value_and_grad(f))(*args)
    (l1, m1), g1 = eager
    (l2, m2), g2 = compiled
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(np.array(g1), np.array(g2), rtol=1e-5, atol=1e-7)
    for k in m1:
        np.testing.assert_allclose(np.array(m1[k]), np.array(m2[k]), rtol=1e-6, atol=1e-7)


def test_compiled_loss_traces_once_per_structure():
    traces = []
    fn = make_policy_loss(LossConfig(loss_type="grpo", beta=0.1))

    def f(x, a, m, r):
        traces.append(1)
        return fn(x, a, m, ref_logprobs=r)[0]

    step = mx.compile(mx.value_and_grad(f))
    for seed in range(4):
        k = mx.random.key(seed)
        x = -mx.random.uniform(shape=(3, 5), key=k)
        step(x, mx.random.normal((3,), key=k), mx.ones((3, 5)), x - 0.1)
    assert len(traces) == 1


def test_users_surrogate_and_reduction_replace_the_table_entries():
    from grpo.core.loss import LOSSES, make_policy_loss
    from grpo.core.step import accumulation_weights_for, per_token_weights

    cfg = LossConfig(loss_type="grpo")
    logp = mx.array([[-1.0, -2.0, -0.5], [-0.3, -0.2, -4.0]])
    adv = mx.array([1.5, -0.5])
    mask = mx.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    zero = make_policy_loss(cfg, surrogate=lambda t: (mx.zeros_like(t.logprobs), {}))
    assert zero(logp, adv, mask)[0].item() == 0.0
    # Ratio 1 (no old log-probs): the clipped surrogate is -A on every live token.
    summed = make_policy_loss(cfg, reduction=lambda per_token, m, n: (per_token * m).sum())
    want = -(1.5 * 2 + -0.5 * 3)
    assert summed(logp, adv, mask)[0].item() == pytest.approx(want)
    # One table drives the accumulation weights too.
    assert all(
        (accumulation_weights_for(name) is per_token_weights) == row.per_token
        for name, row in LOSSES.items()
    )
