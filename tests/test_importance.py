"""The sampler-mismatch correction against a NumPy re-derivation of TRL 1.16's formulas:
the ratio and its metrics, and the loss that carries it (``rollout_quantization``)."""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import math
import zlib

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference_numpy import (
    np_grad_fd,
    np_policy_loss,
    np_sampler_correction,
    np_sampler_metrics,
)
from strategies import sampler_batches

from grpo.core.batch import LossBatch
from grpo.core.importance import IS_MODES, sampler_correction, sampler_metrics
from grpo.core.loss import LOSS_TYPES, LossConfig, make_policy_loss
from grpo.core.pipeline import correct_sampler, micro_batches

BOUNDS = [(None, 3.0), (0.5, 2.0), (0.8, None), (None, None)]


def _case(seed, N=4, T=6):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, (N, T)).astype(np.float32)
    samp = (old + rng.normal(0.0, 0.6, (N, T))).astype(np.float32)
    samp[0, 1] = np.nan  # a token the sampler could not score
    mask = (rng.random((N, T)) < 0.8).astype(np.float32)
    mask[:, 0] = 1.0
    return old, samp, mask


def _valid(mode, lo, hi):
    # GRPOConfig refuses a truncate mode without any bound, as TRL does.
    return not (mode.endswith("truncate") and lo is None and hi is None)


# ------------------------------------------------------------------ the ratio


@pytest.mark.parametrize("mode,clip", [(m, c) for m in IS_MODES for c in BOUNDS if _valid(m, *c)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ratio_and_metrics_match_numpy(mode, clip, seed):
    lo, hi = clip
    old, samp, mask = _case(seed)
    got = sampler_correction(
        mx.array(old), mx.array(samp), mx.array(mask), mode=mode, clip_min=lo, clip_max=hi
    )
    want = np_sampler_correction(old, samp, mask, mode, lo, hi)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    seq = mode.startswith("sequence")
    metrics = sampler_metrics(mx.array(old), mx.array(samp), mx.array(mask), got, sequence=seq)
    for k, v in np_sampler_metrics(old, samp, mask, want, sequence=seq).items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)


@given(sampler_batches())
def test_ratio_matches_numpy_property(case):
    old, samp, mask, mode, lo, hi = case
    got = np.array(
        sampler_correction(
            mx.array(old), mx.array(samp), mx.array(mask), mode=mode, clip_min=lo, clip_max=hi
        )
    )
    want = np_sampler_correction(old, samp, mask, mode, lo, hi)
    assert got.shape == want.shape == ((old.shape[0], 1) if "sequence" in mode else old.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.isfinite(got).all()  # NaN sampling log-probs never reach the loss
    seq = mode.startswith("sequence")
    metrics = sampler_metrics(
        mx.array(old), mx.array(samp), mx.array(mask), mx.array(got), sequence=seq
    )
    for k, v in np_sampler_metrics(old, samp, mask, want, sequence=seq).items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-4, atol=1e-5, err_msg=k)


@given(sampler_batches())
def test_truncate_stays_in_bounds_and_mask_keeps_or_zeroes(case):
    old, samp, mask, mode, lo, hi = case
    raw = np_sampler_correction(old, samp, mask, mode.split("_")[0] + "_mask", None, None)
    got = np.array(
        sampler_correction(
            mx.array(old), mx.array(samp), mx.array(mask), mode=mode, clip_min=lo, clip_max=hi
        )
    )
    low, high = (-np.inf if lo is None else lo), (np.inf if hi is None else hi)
    if mode.endswith("truncate"):
        assert (got >= low * (1 - 1e-6)).all() and (got <= high * (1 + 1e-6)).all()
    else:
        kept = got != 0
        np.testing.assert_allclose(got[kept], raw[kept], rtol=1e-4)
        inside = (raw >= low * (1 + 1e-5)) & (raw <= high * (1 - 1e-5))
        assert kept[inside].all()


@given(sampler_batches())
def test_dead_and_unscorable_tokens_carry_no_correction(case):
    # A token off the mask, or one the sampler returned NaN for, contributes log-ratio 0.
    old, samp, mask, mode, lo, hi = case
    token = mode.replace("sequence", "token")
    got = np.array(
        sampler_correction(
            mx.array(old), mx.array(samp), mx.array(mask), mode=token, clip_min=None, clip_max=1e30
        )
    )
    neutral = (mask == 0) | np.isnan(samp)
    np.testing.assert_array_equal(got[neutral], 1.0)


def test_hand_computed():
    old = mx.array([[0.0, -1.0]])
    samp = mx.array([[math.log(2.0), -1.0]])  # sampler put twice the mass on token 0
    mask = mx.ones((1, 2))
    tok = sampler_correction(old, samp, mask, mode="token_truncate", clip_min=None, clip_max=3.0)
    np.testing.assert_allclose(np.array(tok), [[0.5, 1.0]], rtol=1e-6)
    seq = sampler_correction(old, samp, mask, mode="sequence_mask", clip_min=0.6, clip_max=3.0)
    np.testing.assert_allclose(np.array(seq), [[0.0]])  # 0.5 < 0.6: masked


def test_nan_sampling_logprob_gives_ratio_one_and_is_left_out_of_the_difference():
    old = mx.array([[-1.0, -2.0]])
    samp = mx.array([[math.nan, -2.5]])
    mask = mx.ones((1, 2))
    r = sampler_correction(old, samp, mask, mode="token_mask", clip_min=None, clip_max=3.0)
    np.testing.assert_allclose(np.array(r), [[1.0, math.exp(0.5)]], rtol=1e-6)
    m = sampler_metrics(old, samp, mask, r)
    assert float(m["sampling/sampling_logp_difference/max"]) == pytest.approx(0.5)


def test_empty_mask_gives_zero_metrics():
    z = mx.zeros((2, 3))
    r = sampler_correction(z, z, z, mode="token_truncate", clip_min=None, clip_max=3.0)
    m = sampler_metrics(z, z, z, r)
    assert all(float(v) == 0.0 for v in m.values())


def test_one_token_completions_use_the_mode_not_the_shape():
    # T = 1: a token mode's ratio is [N, 1] too; its metrics still skip dead rows (TRL).
    old, samp = mx.array([[-1.0], [-1.0]]), mx.array([[-1.5], [-3.0]])
    mask = mx.array([[1.0], [0.0]])
    r = sampler_correction(old, samp, mask, mode="token_truncate", clip_min=None, clip_max=3.0)
    token = sampler_metrics(old, samp, mask, r, sequence=False)
    assert float(token["sampling/importance_sampling_ratio/max"]) == pytest.approx(math.exp(0.5))
    seq = sampler_metrics(old, samp, mask, r, sequence=True)
    assert float(seq["sampling/importance_sampling_ratio/min"]) == pytest.approx(1.0)


def test_rejects_unknown_mode():
    z = mx.zeros((1, 1))
    with pytest.raises(ValueError, match="mode"):
        sampler_correction(z, z, z, mode="token", clip_min=None, clip_max=None)


# ------------------------------------------------------------------ the loss


def _inputs(seed, N=5, T=6):
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-4.0, -0.05, (N, T))
    old = logp + rng.uniform(-0.4, 0.4, (N, T))  # the float policy at sampling time
    samp = old + rng.normal(0.0, 0.3, (N, T))  # the quantized sampler
    samp[1, 2] = np.nan
    ref = logp + rng.uniform(-1.0, 1.0, (N, T))
    ent = rng.uniform(0.0, 3.0, (N, T))
    adv = rng.normal(size=N)
    lengths = np.array([6, 3, 1, 0, 4])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    f32 = lambda x: np.asarray(x, np.float32).astype(np.float64)  # noqa: E731
    return f32(logp), f32(old), f32(samp), f32(ref), f32(ent), f32(adv), mask


EXTRAS = {
    "plain": dict(),
    "kl_masks": dict(beta=0.05, top_entropy_quantile=0.5, off_policy_mask_threshold=0.05),
}


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    "loss_type,mode",
    # TRL (and GRPOConfig) refuse VESPO with a sequence-level correction.
    [(t, m) for t in LOSS_TYPES for m in IS_MODES if t != "vespo" or m.startswith("token")],
)
def test_loss_with_correction_matches_numpy_trl(loss_type, level, mode, extras):
    cfg = LossConfig(
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=8,
        epsilon_high=0.28, **EXTRAS[extras],
    )  # fmt: skip
    seed = zlib.crc32(f"{loss_type}/{level}/{mode}/{extras}".encode())
    logp, old, samp, ref, ent, adv, mask = _inputs(seed)
    ratio = np_sampler_correction(old, samp, mask, mode, 0.7, 1.4)
    num_items = 11.0 if loss_type in ("dapo", "cispo", "vespo") else None
    f32 = lambda x: mx.array(np.asarray(x, np.float32))  # noqa: E731
    fn = make_policy_loss(cfg)

    def f(x):
        return fn(
            x, f32(adv), f32(mask), old_logprobs=f32(old), ref_logprobs=f32(ref),
            entropies=f32(ent), num_items_in_batch=num_items, sampling_logprobs=f32(samp),
            sampler_ratio=f32(ratio),
        )  # fmt: skip

    (loss, metrics), grad = mx.value_and_grad(f)(f32(logp))

    def ref_fn(x):
        return np_policy_loss(
            x, adv, mask, cfg, old=old, ref=ref, entropies=ent, num_items=num_items,
            logp_sg=logp, is_ratio=ratio, sampling=samp,
        )  # fmt: skip

    want, want_metrics = ref_fn(logp)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5, atol=1e-5)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(metrics[name].item(), value, rtol=1e-5, atol=1e-5, err_msg=name)
    fd = np_grad_fd(lambda x: ref_fn(x)[0], logp)
    np.testing.assert_allclose(np.array(grad), fd, rtol=1e-4, atol=1e-4)


def test_the_ratio_changes_the_loss_and_ratio_one_does_not():
    logp, old, samp, _, _, adv, mask = _inputs(3)
    cfg = LossConfig(loss_type="dapo")
    args = [mx.array(np.asarray(x, np.float32)) for x in (logp, adv, mask, old)]
    fn = make_policy_loss(cfg)
    plain = fn(*args[:3], old_logprobs=args[3])[0].item()
    ones = fn(*args[:3], old_logprobs=args[3], sampler_ratio=mx.ones((5, 1)))[0].item()
    ratio = np_sampler_correction(old, samp, mask, "token_truncate", None, 3.0)
    weighted = fn(*args[:3], old_logprobs=args[3], sampler_ratio=mx.array(ratio, mx.float32))
    assert ones == pytest.approx(plain, abs=1e-7)
    assert abs(weighted[0].item() - plain) > 1e-4


def test_loss_rejects_a_ratio_of_the_wrong_shape():
    fn = make_policy_loss(LossConfig())
    with pytest.raises(ValueError, match=r"sampler_ratio.shape=\(2, 3\)"):
        fn(mx.zeros((2, 4)), mx.zeros(2), mx.ones((2, 4)), sampler_ratio=mx.ones((2, 3)))


# ------------------------------------------------------------------ the pipeline


@pytest.mark.parametrize("mode", IS_MODES)
def test_correct_sampler_builds_trls_ratio_and_splits_into_micro_batches(mode):
    old, samp, mask = _case(4, N=8, T=5)
    batch = LossBatch(
        input_ids=mx.zeros((8, 9), mx.int32), completion_start=mx.full((8,), 4, mx.int32),
        completion_ids=mx.zeros((8, 5), mx.int32), completion_mask=mx.array(mask),
        advantages=mx.zeros((8,)), old_logprobs=mx.array(old),
    )  # fmt: skip
    out = correct_sampler(batch, mx.array(samp), mode=mode, clip_min=0.5, clip_max=2.0)
    want = np_sampler_correction(old, samp, mask, mode, 0.5, 2.0)
    np.testing.assert_allclose(np.array(out.sampler_ratio), want, rtol=1e-5, atol=1e-6)
    windows = micro_batches(out, micro=2, K=2)
    assert windows[0].sampler_ratio.shape == (2, 2) + want.shape[1:]
    off = correct_sampler(batch, mx.array(samp), correction=False)
    assert off.sampler_ratio is None and off.sampling_logprobs is not None
    with pytest.raises(ValueError, match="old_logprobs"):
        correct_sampler(batch._replace(old_logprobs=None), mx.array(samp))


@given(st.sampled_from(IS_MODES), st.integers(0, 10_000))
def test_correct_sampler_property(mode, seed):
    old, samp, mask = _case(seed, N=3, T=4)
    batch = LossBatch(
        input_ids=mx.zeros((3, 6), mx.int32), completion_start=mx.full((3,), 2, mx.int32),
        completion_ids=mx.zeros((3, 4), mx.int32), completion_mask=mx.array(mask),
        advantages=mx.zeros((3,)), old_logprobs=mx.array(old),
    )  # fmt: skip
    out = correct_sampler(batch, mx.array(samp), mode=mode, clip_min=None, clip_max=3.0)
    want = np_sampler_correction(old, samp, mask, mode, None, 3.0)
    np.testing.assert_allclose(np.array(out.sampler_ratio), want, rtol=1e-5, atol=1e-6)
