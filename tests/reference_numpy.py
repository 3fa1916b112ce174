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


# ---------------------------------------------------------------------------------------
# Policy loss (loss helper).
# Re-derived from trl/trainer/grpo_trainer.py::_compute_loss, get_high_entropy_mask,
# get_off_policy_mask and get_gamma_weights, written as one straight-line function in
# float64 on purpose (the opposite shape of grpo.core.loss). `logp_sg` is the value of the
# *detached* copies of logp (old default, cispo/vespo weights, off-policy mask) so a finite
# difference can perturb logp while holding the stop-gradient parts fixed.
# ---------------------------------------------------------------------------------------


def np_kl_k3(logp, ref):
    d = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
    return np.exp(d) - d - 1.0


def np_quantile_mask(entropies, mask, threshold):
    """TRL get_high_entropy_mask on one process: entropy >= quantile(active entropies)."""
    active = np.asarray(mask) > 0
    values = np.asarray(entropies, np.float64)[active]
    if values.size == 0:
        return np.zeros_like(active)
    return (np.asarray(entropies, np.float64) >= np.quantile(values, threshold)) & active


def np_policy_loss(
    logp,
    adv,
    mask,
    cfg,
    *,
    old=None,
    ref=None,
    entropies=None,
    num_items=None,
    logp_sg=None,
    entropy_coef=None,
    is_ratio=None,
    sampling=None,
):
    """TRL 1.16 `_compute_loss` from per-token log-probs (eval mode, one process).

    `is_ratio` is TRL's `inputs["importance_sampling_ratio"]` (vLLM correction on) and
    `sampling` its `inputs["sampling_per_token_logps"]`.
    Returns (loss, metrics) as Python floats; `cfg` is read only for its field values.
    """
    f = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    logp, adv, mask, old, ref, ent = f(logp), f(adv)[:, None], f(mask), f(old), f(ref), f(entropies)
    sg = logp.copy() if logp_sg is None else f(logp_sg)
    old = sg if old is None else old
    eps_low, eps_high = cfg.epsilon, cfg.epsilon_high
    metrics = {}

    entropy_mask = None
    if cfg.top_entropy_quantile < 1.0:
        entropy_mask = np_quantile_mask(ent, mask, 1 - cfg.top_entropy_quantile)
    if cfg.off_policy_mask_threshold is not None:
        seen = old if sampling is None else f(sampling)
        kl_div = np.nan_to_num(seen - sg, nan=0.0)
        seq_kl = (kl_div * mask).sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1)
        opm = ((adv >= 0) | (seq_kl <= cfg.off_policy_mask_threshold)).astype(np.float64)

    def importance_weight(log_ratio):
        if cfg.importance_sampling_level == "token":
            return np.exp(log_ratio)
        return np.exp((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))[:, None]

    coef_1 = importance_weight(logp - old)
    if cfg.beta != 0.0:
        per_token_kl = np_kl_k3(logp, ref)
        if cfg.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    lt = cfg.loss_type
    if lt == "cispo":
        per_token_loss = -np.minimum(importance_weight(sg - old), eps_high) * adv * logp
    elif lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
        if cfg.delta is not None:
            coef_1 = np.minimum(coef_1, cfg.delta)
        per_token_loss = -np.minimum(coef_1 * adv, coef_2 * adv)
    elif lt == "sapo":
        tau = np.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        per_token_loss = -(1 / (1 + np.exp(-tau * (coef_1 - 1)))) * 4 / tau * adv
    elif lt == "vespo":
        seq = (np.clip(sg - old, -20, 20) * mask).sum(-1, keepdims=True)
        if is_ratio is not None:
            with np.errstate(divide="ignore"):
                log_is = np.clip(np.log(f(is_ratio)), np.log(1e-8), 20.0)
            seq = seq + log_is.sum(-1, keepdims=True)
        log_w_seq = np.clip(seq, np.log(1e-8), 20.0)
        k = np.where(adv >= 0, cfg.vespo_k_pos, cfg.vespo_k_neg)
        lam = np.maximum(np.where(adv >= 0, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg), 1e-4)
        phi = np.nan_to_num(np.exp(lam + k * log_w_seq - lam * np.exp(log_w_seq)), nan=0.0)
        per_token_loss = -phi * adv * logp
    if cfg.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * opm
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and lt != "vespo":
        per_token_loss = per_token_loss * f(is_ratio)
    if cfg.beta != 0.0:
        per_token_loss = per_token_loss + cfg.beta * per_token_kl

    N, T = mask.shape
    per_token_loss = np.broadcast_to(per_token_loss, (N, T))
    if lt in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
    elif lt == "bnpo":
        loss = (per_token_loss * mask).sum() / max(mask.sum(), 1.0)
    elif lt == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (N * cfg.max_completion_length)
    elif lt in ("cispo", "dapo", "vespo"):
        n_items = mask.sum() if num_items is None else float(num_items)
        loss = (per_token_loss * mask).sum() / max(n_items, 1.0)
    elif lt == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()

    coef = cfg.entropy_coef if entropy_coef is None else entropy_coef
    if cfg.entropy_coef != 0 or entropy_coef is not None:
        eff = mask if entropy_mask is None else mask * entropy_mask
        metrics["policy_loss"] = loss
        loss = loss - coef * (ent * eff).sum() / max(eff.sum(), 1.0)

    def seq_mean(x):
        if x.shape[1] == 1:
            return x[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (x * mask).sum(-1) / mask.sum(-1)

    def glob_mean(x):
        if x.shape[1] == 1:
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / max(mask.sum(), 1.0)

    def nanext(fn, x):
        return float("nan") if np.isnan(x).all() else float(fn(x))

    if cfg.beta != 0.0:
        metrics["kl"] = glob_mean(per_token_kl)
    if ent is not None:
        metrics["entropy"] = glob_mean(ent)
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low = ((coef_1 < 1 - eps_low) & (adv < 0)).astype(np.float64)
        high = ((coef_1 > 1 + eps_high) & (adv > 0)).astype(np.float64)
        metrics["clip_ratio/low_mean"] = glob_mean(low)
        metrics["clip_ratio/high_mean"] = glob_mean(high)
        metrics["clip_ratio/region_mean"] = glob_mean(np.maximum(low, high))
        metrics["clip_ratio/low_min"] = nanext(np.nanmin, seq_mean(low))
        metrics["clip_ratio/high_max"] = nanext(np.nanmax, seq_mean(high))
    elif lt == "cispo":
        metrics["cispo_clip_ratio"] = glob_mean(((coef_1 > eps_high) & (adv > 0)).astype(float))
    elif lt == "vespo":
        metrics["vespo/phi_seq_mean"] = glob_mean(phi)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def np_sampler_correction(old, samp, mask, mode, clip_min, clip_max):
    """TRL 1.16 `_generate_and_score_completions`: the vLLM importance-sampling ratio."""
    old, samp, mask = (np.asarray(x, np.float64) for x in (old, samp, mask))
    diff = np.nan_to_num((old - samp) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(-1, keepdims=True)
    ratio = np.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return np.clip(ratio, clip_min, clip_max)  # a None bound is no bound, as torch.clamp
    lo = -np.inf if clip_min is None else clip_min
    hi = np.inf if clip_max is None else clip_max
    return np.where((ratio < lo) | (ratio > hi), 0.0, ratio)


def np_sampler_metrics(old, samp, mask, ratio, *, sequence):
    """TRL 1.16's `sampling/*` metrics of the vLLM correction (one process)."""
    delta = np.abs(np.asarray(old, np.float64) - np.asarray(samp, np.float64))
    m = np.asarray(mask).astype(bool)
    d = delta[m & ~np.isnan(delta)]
    flat = ratio.flatten() if sequence else ratio[m]

    def stat(fn, x):
        return float(fn(x)) if x.size else 0.0

    return {
        "sampling/sampling_logp_difference/mean": stat(np.mean, d),
        "sampling/sampling_logp_difference/max": stat(np.max, d),
        "sampling/importance_sampling_ratio/min": stat(np.min, flat),
        "sampling/importance_sampling_ratio/mean": stat(np.mean, flat),
        "sampling/importance_sampling_ratio/max": stat(np.max, flat),
    }


def np_grad_fd(fn, x, h=1e-6):
    """Central finite differences of a scalar function of a float64 array."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


# ---------------------------------------------------------------------------------------
# (end of loss section)
# ---------------------------------------------------------------------------------------
