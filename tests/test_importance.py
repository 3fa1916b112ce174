"""The sampler-mismatch correction against a NumPy re-derivation of TRL 1.16's formulas."""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import math

import mlx.core as mx
import numpy as np
import pytest

from grpo.core.importance import IS_MODES, sampler_correction, sampler_metrics


def np_correction(old, samp, mask, mode, clip_min, clip_max):
    # grpo_trainer.py, _generate_and_score_completions: the vLLM importance-sampling block.
    diff = np.nan_to_num((old - samp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdims=True)
    ratio = np.exp(diff)
    if mode.endswith("truncate"):
        return np.clip(ratio, clip_min, clip_max)  # None bounds are no bounds in np.clip too
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return np.where((ratio < lo) | (ratio > hi), 0.0, ratio)


def np_metrics(old, samp, mask, ratio):
    delta = np.abs(old - samp)
    m = mask.astype(bool)
    d = delta[m & ~np.isnan(delta)]
    flat = ratio.flatten() if ratio.shape[-1] == 1 else ratio[m]

    def stat(f, x):
        return f(x) if x.size else 0.0

    return {
        "sampling/sampling_logp_difference/mean": stat(np.mean, d),
        "sampling/sampling_logp_difference/max": stat(np.max, d),
        "sampling/importance_sampling_ratio/min": stat(np.min, flat),
        "sampling/importance_sampling_ratio/mean": stat(np.mean, flat),
        "sampling/importance_sampling_ratio/max": stat(np.max, flat),
    }


def _case(seed, N=4, T=6):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, (N, T)).astype(np.float32)
    samp = (old + rng.normal(0.0, 0.6, (N, T))).astype(np.float32)
    samp[0, 1] = np.nan  # a token the sampler could not score
    mask = (rng.random((N, T)) < 0.8).astype(np.float32)
    mask[:, 0] = 1.0
    return old, samp, mask


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 2.0), (0.8, None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ratio_and_metrics_match_numpy(mode, clip, seed):
    old, samp, mask = _case(seed)
    lo, hi = clip
    got = sampler_correction(
        mx.array(old), mx.array(samp), mx.array(mask), mode=mode, clip_min=lo, clip_max=hi
    )
    want = np_correction(old.astype(np.float64), samp.astype(np.float64), mask, mode, lo, hi)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    metrics = sampler_metrics(mx.array(old), mx.array(samp), mx.array(mask), got)
    for k, v in np_metrics(old, samp, mask, want).items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)


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


def test_rejects_unknown_mode():
    z = mx.zeros((1, 1))
    with pytest.raises(ValueError, match="mode"):
        sampler_correction(z, z, z, mode="token", clip_min=None, clip_max=None)
