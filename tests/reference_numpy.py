"""Independent NumPy (float64) re-derivations of TRL 1.16's formulas, for comparison tests.

Each section is owned by one helper; append new sections, keep them separate.
"""

import warnings

import numpy as np

# ---------------------------------------------------------------------------------------
# Log-probs, entropy and advantages (core-math).
# Re-derived from trl/trainer/utils.py (selective_log_softmax, entropy_from_logits, nanstd)
# and trl/trainer/grpo_trainer.py::_generate_and_score_completions (reward normalisation).
# ---------------------------------------------------------------------------------------


def np_log_softmax(logits, temperature=1.0):
    """log_softmax(logits / temperature) over the last axis, float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_token_logprobs(logits, tokens, temperature=1.0):
    """TRL selective_log_softmax: gather(log_softmax(logits / T), tokens)."""
    logp = np_log_softmax(logits, temperature)
    return np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def np_entropy(logits, temperature=1.0):
    """TRL entropy_from_logits on logits / T: -sum(p * log p)."""
    logp = np_log_softmax(logits, temperature)
    return -(np.exp(logp) * logp).sum(axis=-1)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def np_nanmean(x, axis=None, keepdims=False):
    return _quiet(np.nanmean, x, axis=axis, keepdims=keepdims)


def np_nanstd(x, axis=None, keepdims=False):
    """TRL nanstd: Bessel-corrected nan-std; NaN when fewer than 2 valid values."""
    x = np.asarray(x, np.float64)
    mean = np_nanmean(x, axis=axis, keepdims=True)
    var = np_nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(count > 1, count / (count - 1), np.nan)
    std = np.sqrt(var * corr)
    if keepdims:
        return std
    return std.reshape(()) if axis is None else np.squeeze(std, axis=axis)


def np_advantages(rewards_per_func, weights, group_size, scale, aggregation):
    """TRL 1.16 reward -> advantage block. Returns (advantages, rewards, is_std_zero)."""
    R = np.asarray(rewards_per_func, np.float64)
    w = np.asarray(weights, np.float64)
    N, F = R.shape
    G = group_size
    unscorable = np.isnan(R).all(axis=1)
    logged = np.nansum(R * w[None, :], axis=1)
    logged[unscorable] = np.nan
    if aggregation == "sum_then_normalize":
        rewards = logged.copy()
        mean = np.repeat(np_nanmean(rewards.reshape(-1, G), axis=1), G)
        if scale in ("group", "none"):
            if G > 1:
                std = np.repeat(np_nanstd(rewards.reshape(-1, G), axis=1), G)
            else:
                std = np.zeros_like(rewards)
        elif scale == "batch":
            std = np.full_like(rewards, np_nanstd(rewards)) if N > 1 else np.zeros_like(rewards)
        else:
            raise ValueError(scale)
        adv = rewards - mean
        if scale != "none":
            adv = adv / (std + 1e-4)
    elif aggregation == "normalize_then_sum":
        grouped = R.reshape(-1, G, F)
        mean_k = np_nanmean(grouped, axis=1, keepdims=True)
        std_k = np_nanstd(grouped, axis=1, keepdims=True) if G > 1 else np.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).reshape(-1, F)
        rewards = np.nansum(reward_k * w[None, :], axis=1)
        rewards[unscorable] = np.nan
        std = np.full_like(rewards, np_nanstd(rewards)) if N > 1 else np.zeros_like(rewards)
        adv = (rewards - np_nanmean(rewards)) / (std + 1e-4)
    else:
        raise ValueError(aggregation)
    is_std_zero = np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)  # torch.isclose defaults
    return np.nan_to_num(adv, nan=0.0), logged, is_std_zero


# ---------------------------------------------------------------------------------------
# (end of core-math section)
# ---------------------------------------------------------------------------------------
