"""The array pieces of the GRPO loss family: KL estimator, importance weights, surrogates,
reductions, token masks, and :data:`LOSSES`, the one table of TRL 1.16's loss types.

=========  ==============================================  ==================================
loss_type  surrogate :math:`\\ell`                          reduce over active tokens
=========  ==============================================  ==================================
grpo       :math:`-\\min(rA, \\operatorname{clip}(r)A)`      mean per sequence, then mean
bnpo       same                                            token mean over the batch
dr_grpo    same                                            sum / (rows * max_completion_length)
dapo       same                                            sum / num_items_in_batch
luspo      same                                            sum per sequence, then mean
cispo      :math:`-\\operatorname{sg}[\\min(r, \\epsilon_{high})] A \\log\\pi`   sum / num_items_in_batch
sapo       :math:`-\\tfrac{4}{\\tau}\\sigma(\\tau(r-1)) A`     mean per sequence, then mean
vespo      :math:`-\\operatorname{sg}[\\phi(w)] A \\log\\pi`     sum / num_items_in_batch
=========  ==============================================  ==================================

Every public function here maps ``mx.array`` s to ``mx.array`` s, with knobs as keyword
floats; none sees a model. :func:`grpo.core.loss.make_policy_loss` assembles them into a
loss. A row of :data:`LOSSES` turns a :class:`grpo.core.loss.LossConfig` (its ``epsilon``,
``delta``, ``max_completion_length``, ...) into the surrogate and reduction closures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx

from grpo.core.numerics import masked_mean, masked_sum, safe_div

if TYPE_CHECKING:
    from grpo.core.loss import LossConfig

Metrics = dict[str, mx.array]

# ----------------------------------------------------------------------------- KL


def kl_k3(logprobs: mx.array, ref_logprobs: mx.array, ratio: mx.array | None = None) -> mx.array:
    """Schulman's k3 estimator of KL(pi || pi_ref), per token.

    .. math:: \\mathrm{KL}_{k3} = e^{d} - d - 1, \\quad d = \\log\\pi_{ref} - \\log\\pi

    Args:
        logprobs: ``[N, T]`` current log-probs.
        ref_logprobs: ``[N, T]`` reference log-probs.
        ratio: optional ``[N, T]`` or ``[N, 1]`` importance ratio to multiply by
            (``use_bias_correction_kl``; DeepSeek-V3.2 eq. 7).

    Returns:
        ``[N, T]`` non-negative KL estimates.
    """
    d = ref_logprobs - logprobs
    # expm1 avoids the cancellation of exp(d) - 1 near d = 0; the max guards an ulp below 0.
    kl = mx.maximum(mx.expm1(d) - d, 0.0)
    return kl if ratio is None else kl * ratio


# ----------------------------------------------------------- importance weights


def token_log_weights(log_ratio: mx.array, mask: mx.array) -> mx.array:
    """Per-token log importance weight ``log pi - log pi_old`` (PPO). ``[N, T] -> [N, T]``."""
    return log_ratio


def sequence_log_weights(log_ratio: mx.array, mask: mx.array) -> mx.array:
    """GSPO's length-normalised sequence log-ratio (GSPO eq. 7). ``[N, T] -> [N, 1]``.

    .. math:: \\log s_i = \\frac{1}{|y_i|}\\sum_t m_{i,t} (\\log\\pi_{i,t} - \\log\\pi^{old}_{i,t})
    """
    return masked_mean(log_ratio, mask, axis=-1)[:, None]


# ---------------------------------------------------------------- surrogates


class Terms(NamedTuple):
    """Per-token quantities every surrogate may use (all float32)."""

    logprobs: mx.array  # [N, T] current log-probs (differentiable)
    log_ratio: mx.array  # [N, T] logprobs - old_logprobs
    ratio: mx.array  # [N, T] (token level) or [N, 1] (sequence level)
    advantages: mx.array  # [N, 1]
    mask: mx.array  # [N, T] 1.0 on active completion tokens
    sampler_ratio: mx.array | None = None  # [N, T] or [N, 1] pi_old / pi_samp (VESPO reads it)


def clipped_surrogate(
    ratio: mx.array,
    advantages: mx.array,
    *,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> tuple[mx.array, mx.array]:
    """PPO's clipped objective, negated (PPO eq. 7; two-sided with INTELLECT-2's delta).

    .. math:: \\ell = -\\min\\big(\\min(r, \\delta) A,\\; \\operatorname{clip}(r, 1-\\epsilon_l, 1+\\epsilon_h) A\\big)

    Args:
        ratio: ``[N, T]`` or ``[N, 1]`` importance ratios.
        advantages: ``[N, 1]``.

    Returns:
        ``(per_token_loss, ratio)`` where the second is the ratio after the delta clamp,
        which TRL's clip metrics are computed from.
    """
    clipped = mx.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    if delta is not None:
        ratio = mx.minimum(ratio, delta)
    return -mx.minimum(ratio * advantages, clipped * advantages), ratio


def cispo_surrogate(
    ratio: mx.array, advantages: mx.array, logprobs: mx.array, *, epsilon_high: float
) -> mx.array:
    """CISPO (MiniMax-M1 eq. 4): clip the detached ratio, weight the log-likelihood.

    .. math:: \\ell = -\\operatorname{sg}[\\min(r, \\epsilon_{high})]\\, A \\log\\pi
    """
    return -mx.stop_gradient(mx.minimum(ratio, epsilon_high)) * advantages * logprobs


def sapo_surrogate(
    ratio: mx.array, advantages: mx.array, *, temperature_pos: float, temperature_neg: float
) -> mx.array:
    """SAPO's soft gate (SAPO eq. 5), temperature by advantage sign (A > 0 uses ``pos``).

    .. math:: \\ell = -\\frac{4}{\\tau}\\,\\sigma\\big(\\tau (r - 1)\\big)\\, A
    """
    tau = mx.where(advantages > 0, temperature_pos, temperature_neg)
    return -mx.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * advantages


_LOG_1E_8 = math.log(1e-8)


def gamma_weights(
    advantages: mx.array,
    log_ratio: mx.array,
    mask: mx.array,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
    sampler_ratio: mx.array | None = None,
) -> mx.array:
    """VESPO's detached Gamma weight of the sequence ratio, normalised so phi(1) = 1.

    .. math:: \\phi(w) = e^{\\lambda} w^{k} e^{-\\lambda w}, \\quad
              \\log w_i = \\sum_t m_{i,t}\\operatorname{clip}(\\log r_{i,t}, -20, 20)
              \\;[+ \\textstyle\\sum_t \\operatorname{clip}(\\log\\rho_{i,t}, \\log 10^{-8}, 20)]

    Args:
        advantages: ``[N, 1]``; ``k``/``lambda`` use the ``pos`` pair where ``A >= 0``.
        log_ratio: ``[N, T]`` token log-ratios.
        mask: ``[N, T]``.
        sampler_ratio: ``[N, T]`` the sampler correction ``rho`` (token modes), folded into
            ``w`` in log space as TRL does (summed over every column, as TRL does).

    Returns:
        ``[N, 1]`` weights, without gradient.
    """
    log_ratio = mx.stop_gradient(log_ratio)
    seq = masked_sum(mx.clip(log_ratio, -20.0, 20.0), mask, axis=-1, keepdims=True)
    if sampler_ratio is not None:
        seq = seq + mx.clip(mx.log(sampler_ratio), _LOG_1E_8, 20.0).sum(axis=-1, keepdims=True)
    log_w = mx.clip(seq, _LOG_1E_8, 20.0)
    nonneg = advantages >= 0
    k = mx.where(nonneg, k_pos, k_neg)
    lam = mx.maximum(mx.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    phi = mx.exp(lam + k * log_w - lam * mx.exp(log_w))
    return mx.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def vespo_surrogate(phi: mx.array, advantages: mx.array, logprobs: mx.array) -> mx.array:
    """VESPO: ``-phi(w) A log pi`` with ``phi`` from :func:`gamma_weights`."""
    return -phi * advantages * logprobs


# ------------------------------------------------------------------- metrics


def _global_mean(x: mx.array, mask: mx.array) -> mx.array:
    # TRL's global_masked_mean: a [N, 1] (sequence-level) quantity averages over rows.
    if x.shape[-1] == 1:
        return x.mean()
    return masked_mean(x, mask)


def _row_means(x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    # (per-row means [N], row-has-tokens [N]); TRL's masked_seq_mean gives NaN for empty rows.
    if x.shape[-1] == 1:
        return x[:, 0], mx.ones(x.shape[:1], dtype=mx.bool_)
    count = mask.sum(axis=-1)
    return safe_div(masked_sum(x, mask, axis=-1), count), count > 0


def _nan_extreme(values: mx.array, valid: mx.array, *, reduce, fill: float) -> mx.array:
    # nanmin / nanmax over valid rows; NaN when no row is valid.
    out = reduce(mx.where(valid, values, fill))
    return mx.where(valid.any(), out, mx.nan)


def clip_metrics(
    ratio: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> Metrics:
    """TRL's ``clip_ratio/*``: fraction of tokens whose clipped branch is active.

    Args:
        ratio: ``[N, T]`` or ``[N, 1]`` (after the ``delta`` clamp).
        advantages: ``[N, 1]``.
        mask: ``[N, T]``.
    """
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).astype(mx.float32)
    high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).astype(mx.float32)
    region = mx.maximum(low, high)
    low_rows, valid = _row_means(low, mask)
    high_rows, _ = _row_means(high, mask)
    return {
        "clip_ratio/low_mean": _global_mean(low, mask),
        "clip_ratio/low_min": _nan_extreme(low_rows, valid, reduce=mx.min, fill=math.inf),
        "clip_ratio/high_mean": _global_mean(high, mask),
        "clip_ratio/high_max": _nan_extreme(high_rows, valid, reduce=mx.max, fill=-math.inf),
        "clip_ratio/region_mean": _global_mean(region, mask),
    }


# -------------------------------------------------------- surrogate builders

Surrogate = Callable[[Terms], tuple[mx.array, Metrics]]


def _clipped(cfg: LossConfig) -> Surrogate:
    eps_low, eps_high = cfg.epsilon, cfg.epsilon_high

    def surrogate(t: Terms):
        loss, ratio = clipped_surrogate(
            t.ratio, t.advantages, epsilon_low=eps_low, epsilon_high=eps_high, delta=cfg.delta
        )
        metrics = clip_metrics(
            ratio, t.advantages, t.mask, epsilon_low=eps_low, epsilon_high=eps_high
        )
        return loss, metrics

    return surrogate


def _cispo(cfg: LossConfig) -> Surrogate:
    def surrogate(t: Terms):
        loss = cispo_surrogate(t.ratio, t.advantages, t.logprobs, epsilon_high=cfg.epsilon_high)
        clipped = ((t.ratio > cfg.epsilon_high) & (t.advantages > 0)).astype(mx.float32)
        return loss, {"cispo_clip_ratio": _global_mean(clipped, t.mask)}

    return surrogate


def _sapo(cfg: LossConfig) -> Surrogate:
    def surrogate(t: Terms):
        loss = sapo_surrogate(
            t.ratio,
            t.advantages,
            temperature_pos=cfg.sapo_temperature_pos,
            temperature_neg=cfg.sapo_temperature_neg,
        )
        return loss, {}

    return surrogate


def _vespo(cfg: LossConfig) -> Surrogate:
    def surrogate(t: Terms):
        phi = gamma_weights(
            t.advantages,
            t.log_ratio,
            t.mask,
            k_pos=cfg.vespo_k_pos,
            lambda_pos=cfg.vespo_lambda_pos,
            k_neg=cfg.vespo_k_neg,
            lambda_neg=cfg.vespo_lambda_neg,
            sampler_ratio=t.sampler_ratio,
        )
        return vespo_surrogate(phi, t.advantages, t.logprobs), {"vespo/phi_seq_mean": phi.mean()}

    return surrogate


# ---------------------------------------------------------------- reductions
# Each maps (per_token_loss [N, T], mask [N, T], num_items_in_batch scalar) -> scalar.


def sequence_mean_reduction(per_token_loss: mx.array, mask: mx.array, num_items) -> mx.array:
    """GRPO/SAPO: mean over each sequence's active tokens, then over sequences."""
    return masked_mean(per_token_loss, mask, axis=-1).mean()


def token_mean_reduction(per_token_loss: mx.array, mask: mx.array, num_items) -> mx.array:
    """BNPO: mean over all active tokens of the batch."""
    return masked_mean(per_token_loss, mask)


def sequence_sum_reduction(per_token_loss: mx.array, mask: mx.array, num_items) -> mx.array:
    """LUSPO: sum over each sequence's active tokens, then mean over sequences."""
    return masked_sum(per_token_loss, mask, axis=-1).mean()


def global_token_reduction(per_token_loss: mx.array, mask: mx.array, num_items) -> mx.array:
    """DAPO/CISPO/VESPO: token sum divided by the generation batch's active-token count."""
    return masked_sum(per_token_loss, mask) / mx.maximum(num_items, 1.0)


def _constant_length(cfg: LossConfig):
    def reduction(per_token_loss: mx.array, mask: mx.array, num_items) -> mx.array:
        # Dr. GRPO: a constant denominator, so no per-sequence length bias.
        rows = per_token_loss.shape[0]
        return masked_sum(per_token_loss, mask) / (rows * cfg.max_completion_length)

    return reduction


Reduction = Callable[[mx.array, mx.array, mx.array], mx.array]


def _fixed(reduction: Reduction) -> Callable[[LossConfig], Reduction]:
    return lambda cfg: reduction


class LossType(NamedTuple):
    """One row of :data:`LOSSES`: how a loss type is built and normalised."""

    surrogate: Callable[[LossConfig], Surrogate]  # cfg -> f(Terms) -> (per-token loss, metrics)
    reduction: Callable[[LossConfig], Reduction]  # cfg -> f(per_token, mask, num_items) -> loss
    per_token: bool  # under accumulation, micro-batches weigh by live tokens (else sequences)
    clipped: bool  # PPO clipping, with TRL's clip_ratio/* metrics


# The one table of loss types: the config, the loss, the step's accumulation weights and the
# CLI's help all read it.
LOSSES: dict[str, LossType] = {
    "grpo": LossType(_clipped, _fixed(sequence_mean_reduction), per_token=False, clipped=True),
    "bnpo": LossType(_clipped, _fixed(token_mean_reduction), per_token=True, clipped=True),
    "dr_grpo": LossType(_clipped, _constant_length, per_token=False, clipped=True),
    "dapo": LossType(_clipped, _fixed(global_token_reduction), per_token=True, clipped=True),
    "cispo": LossType(_cispo, _fixed(global_token_reduction), per_token=True, clipped=False),
    "sapo": LossType(_sapo, _fixed(sequence_mean_reduction), per_token=False, clipped=False),
    "luspo": LossType(_clipped, _fixed(sequence_sum_reduction), per_token=False, clipped=True),
    "vespo": LossType(_vespo, _fixed(global_token_reduction), per_token=True, clipped=False),
}
LOSS_TYPES = tuple(LOSSES)
CLIPPED_LOSS_TYPES = tuple(name for name, t in LOSSES.items() if t.clipped)

# Importance-sampling level -> log importance weight of each token (or sequence).
LOG_WEIGHTS = {"token": token_log_weights, "sequence": sequence_log_weights}
IMPORTANCE_SAMPLING_LEVELS = tuple(LOG_WEIGHTS)

# -------------------------------------------------------------- token masks


def high_entropy_mask(entropies: mx.array, mask: mx.array, *, quantile: float) -> mx.array:
    """Tokens whose entropy is at or above the ``quantile`` of active-token entropies.

    The quantile interpolates linearly between order statistics (``torch.quantile``). With
    ``quantile = 1 - rho`` this keeps the top-rho tokens (Wang et al., "Beyond the 80/20
    rule").

    Args:
        entropies: ``[N, T]`` per-token entropies (no gradient flows through the mask).
        mask: ``[N, T]`` active tokens.

    Returns:
        ``[N, T]`` float32 in {0, 1}, zero off ``mask``.
    """
    active = mask > 0
    h = mx.stop_gradient(entropies).astype(mx.float32)
    # Inactive tokens sort to the end; only the first `count` sorted values are used.
    ordered = mx.sort(mx.where(active, h, mx.inf).reshape(-1))
    count = active.sum()
    pos = quantile * mx.maximum(count - 1, 0).astype(mx.float32)
    lo = mx.floor(pos)
    lo_v = ordered[lo.astype(mx.int32)]
    hi_v = ordered[mx.ceil(pos).astype(mx.int32)]
    threshold = lo_v + (pos - lo) * mx.where(hi_v > lo_v, hi_v - lo_v, 0.0)
    return (active & (h >= threshold)).astype(mx.float32)


def off_policy_mask(
    advantages: mx.array,
    logprobs: mx.array,
    old_logprobs: mx.array,
    mask: mx.array,
    *,
    threshold: float,
) -> mx.array:
    """DeepSeek-V3.2 off-policy sequence mask (eq. 9): keep if ``A >= 0`` or mean KL <= delta.

    .. math:: M_i = [A_i \\ge 0] \\lor \\Big[\\tfrac{1}{|y_i|}\\sum_t m_{i,t}
              (\\log\\pi^{old}_{i,t} - \\operatorname{sg}\\log\\pi_{i,t}) \\le \\delta\\Big]

    Args:
        advantages: ``[N, 1]``.
        logprobs: ``[N, T]`` current log-probs.
        old_logprobs: ``[N, T]`` sampling-time log-probs.
        mask: ``[N, T]``.

    Returns:
        ``[N, 1]`` float32 in {0, 1}.
    """
    # NaN (unscorable) tokens carry no KL evidence, as in TRL.
    kl = mx.nan_to_num(old_logprobs - mx.stop_gradient(logprobs), nan=0.0)
    seq_kl = masked_mean(kl, mask, axis=-1)[:, None]
    return ((advantages >= 0) | (seq_kl <= threshold)).astype(mx.float32)
