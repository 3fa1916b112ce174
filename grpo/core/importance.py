"""Sampler/trainer mismatch correction, as TRL 1.16 corrects vLLM's (truncated or masked IS).

.. math::

    \\rho_{i,t} = \\exp\\big(m_{i,t}\\,(\\log\\pi_{old}(y_{i,t}) - \\log\\pi_{samp}(y_{i,t}))\\big)
    \\quad\\text{(token)}, \\qquad
    \\rho_i = \\exp\\Big(\\sum_t m_{i,t}\\,(\\log\\pi_{old} - \\log\\pi_{samp})\\Big)
    \\quad\\text{(sequence)}

``*_truncate`` clamps :math:`\\rho` to ``[clip_min, clip_max]`` (truncated IS); ``*_mask``
sets it to 0 outside that range (masked IS). A missing bound is no bound. The per-token
loss is multiplied by :math:`\\rho` (VESPO adds :math:`\\log\\rho` to its sequence
log-ratio instead). Tokens whose sampling log-prob is NaN get a zero difference, so ratio
1, as in TRL. ``log pi_samp`` is what the sampler drew with (here: the quantized copy of
the policy), ``log pi_old`` the trainer's own forward at sampling time.
"""

from __future__ import annotations

import math

import mlx.core as mx

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_log_ratio(
    old_logprobs: mx.array, sampling_logprobs: mx.array, mask: mx.array, *, sequence: bool
) -> mx.array:
    """``[N, T]`` (token) or ``[N, 1]`` (sequence) ``log pi_old - log pi_samp`` on live tokens.

    Args:
        old_logprobs: ``[N, T]`` trainer log-probs of the sampled tokens.
        sampling_logprobs: ``[N, T]`` the sampler's log-probs of the same tokens.
        mask: ``[N, T]`` 1 on live (sampled, trained) tokens.
        sequence: sum over each row (TRL's ``sequence_*`` modes).
    """
    diff = mx.nan_to_num((old_logprobs - sampling_logprobs) * mask, nan=0.0)
    return diff.sum(axis=-1, keepdims=True) if sequence else diff


def sampler_correction(
    old_logprobs: mx.array,
    sampling_logprobs: mx.array,
    mask: mx.array,
    *,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> mx.array:
    """TRL's ``vllm_importance_sampling_ratio``: ``[N, T]`` (token modes) or ``[N, 1]``.

    .. math:: \\rho^{trunc} = \\operatorname{clip}(\\rho, c_{min}, c_{max}), \\qquad
              \\rho^{mask} = \\rho\\,[c_{min} \\le \\rho \\le c_{max}]

    Args:
        old_logprobs, sampling_logprobs, mask: ``[N, T]``.
        mode: one of :data:`IS_MODES`.
        clip_min, clip_max: the bounds (``None``: unbounded on that side).
    """
    if mode not in IS_MODES:
        raise ValueError(f"sampler_correction: mode must be one of {IS_MODES}, got {mode!r}")
    log_ratio = sampler_log_ratio(
        old_logprobs, sampling_logprobs, mask, sequence=mode.startswith("sequence")
    )
    ratio = mx.exp(log_ratio)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return mx.clip(ratio, lo, hi)
    return mx.where((ratio < lo) | (ratio > hi), 0.0, ratio)


def _masked_stats(x: mx.array, keep: mx.array, prefix: str, names=("min", "mean", "max")):
    # min / mean / max over the kept entries; 0 when none is kept (TRL).
    n = keep.sum()
    any_kept = n > 0
    lo = mx.where(keep, x, math.inf).min()
    hi = mx.where(keep, x, -math.inf).max()
    mean = mx.where(keep, x, 0.0).sum() / mx.maximum(n, 1)
    vals = {
        "min": mx.where(any_kept, lo, 0.0),
        "mean": mx.where(any_kept, mean, 0.0),
        "max": mx.where(any_kept, hi, 0.0),
    }
    return {f"{prefix}/{k}": vals[k] for k in names}


def sampler_metrics(
    old_logprobs: mx.array,
    sampling_logprobs: mx.array,
    mask: mx.array,
    ratio: mx.array,
    *,
    sequence: bool | None = None,
) -> dict[str, mx.array]:
    """TRL's mismatch metrics: ``sampling/sampling_logp_difference/{mean,max}`` of
    ``|log pi_old - log pi_samp|`` on live, scorable tokens, and
    ``sampling/importance_sampling_ratio/{min,mean,max}`` over live tokens (token modes)
    or every row (sequence modes).

    Args:
        old_logprobs, sampling_logprobs, mask: ``[N, T]``.
        ratio: ``[N, T]`` or ``[N, 1]`` from :func:`sampler_correction`.
        sequence: the ratio is a sequence mode's (``None``: when it is ``[N, 1]`` and
            ``T > 1``; pass it when ``T`` may be 1).
    """
    live = mask > 0
    delta = mx.abs(old_logprobs - sampling_logprobs)
    keep = live & ~mx.isnan(delta)
    out = _masked_stats(
        mx.nan_to_num(delta, nan=0.0),
        keep,
        "sampling/sampling_logp_difference",
        names=("mean", "max"),
    )
    if sequence is None:
        sequence = ratio.shape[-1] == 1 and mask.shape[-1] > 1
    kept = mx.ones(ratio.shape, mx.bool_) if sequence else live
    out.update(_masked_stats(ratio, kept, "sampling/importance_sampling_ratio"))
    return out
