"""The GRPO policy-loss family of TRL 1.16, as small functions chosen by a factory.

.. math::

    \\mathcal{L}(\\theta) = \\operatorname{reduce}_{i,t}\\Big[
        m_{i,t}\\,\\ell\\big(r_{i,t}(\\theta), A_i\\big)
        + \\beta\\, \\mathrm{KL}_{k3}\\big(\\pi_\\theta \\,\\|\\, \\pi_{\\mathrm{ref}}\\big)_{i,t}\\Big]
        - c_H\\, \\bar H

with the importance ratio :math:`r = \\pi_\\theta / \\pi_{\\mathrm{old}}` per token or, for GSPO
(``importance_sampling_level="sequence"``), :math:`\\exp` of the masked mean log-ratio of
each sequence. The surrogate :math:`\\ell` and the ``reduce`` step are picked once by
:func:`make_policy_loss` from :class:`LossConfig`:

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

Everything here is pure: arrays in, ``(loss, metrics)`` out, traceable by ``mx.compile`` and
``mx.value_and_grad`` (config values are Python constants closed over at build time).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import attrs
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from grpo.core.batch import LossBatch
from grpo.core.lm import (
    completion_logits,
    head,
    head_parameters,
    make_head_fn,
    split_ok,
    trunk,
)
from grpo.core.logprobs import (
    DEFAULT_HEAD_CHUNK_ELEMENTS,
    head_chunk_rows,
    head_logprobs,
    token_logprobs,
    token_logprobs_and_entropy,
)
from grpo.core.numerics import masked_mean, masked_sum, safe_div
from grpo.core.shared_prompt import can_share, shared_prompt_hidden

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

Metrics = dict[str, mx.array]


def _one_of(choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise ValueError(
                f"{attribute.name} must be one of {list(choices)}, got {attribute.name}={value!r}"
            )

    return check


@attrs.frozen
class LossConfig:
    """Knobs of the policy loss, named and defaulted as in TRL 1.16 ``GRPOConfig``.

    Attributes:
        loss_type: one of :data:`LOSS_TYPES` (TRL default ``"dapo"``).
        importance_sampling_level: ``"token"`` (per-token ratio) or ``"sequence"`` (GSPO).
        epsilon: lower clip, the ratio is clipped below at ``1 - epsilon``.
        epsilon_high: upper clip ``1 + epsilon_high``; ``None`` means ``epsilon`` (resolved
            at construction, so ``attrs.evolve(cfg, epsilon=...)`` keeps the old value). For
            ``cispo`` it is the absolute cap on the ratio (ScaleRL's epsilon_max).
        delta: ``None`` or the two-sided (INTELLECT-2) upper clamp of the unclipped ratio.
        beta: KL coefficient; 0 disables the KL term.
        use_bias_correction_kl: multiply the k3 KL by the (differentiable) importance ratio.
        top_entropy_quantile: keep only the top-rho fraction of tokens by entropy; 1.0 = off.
        off_policy_mask_threshold: ``None`` or DeepSeek-V3.2's delta: drop sequences with
            negative advantage whose mean ``old - current`` log-ratio exceeds it.
        entropy_coef: coefficient of the entropy bonus ``- c * mean entropy`` (0 = off).
        max_completion_length: the constant denominator of ``dr_grpo``.
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures for A > 0 / A <= 0.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO Gamma weights.
        temperature: sampling temperature; :func:`grpo_loss` scores completions under
            ``softmax(logits / temperature)`` as TRL does, so it must match the sampler.
        prompt_share: rows ``j*k .. j*k+k-1`` of every batch share a prompt (``k`` =
            this); the forward then runs each prompt once (:mod:`grpo.core.shared_prompt`).
            1 (default) makes no assumption. The trainer sets
            ``gcd(per_device_train_batch_size, num_generations)``.
        head_chunk_elements: logits elements (``positions * V``) the LM head forms at
            once in the loss; bounds the head's memory, not its result.
    """

    loss_type: str = attrs.field(
        default="dapo", validator=lambda i, a, v: _one_of(LOSS_TYPES)(i, a, v)
    )
    importance_sampling_level: str = attrs.field(
        default="token", validator=_one_of(IMPORTANCE_SAMPLING_LEVELS)
    )
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0
    max_completion_length: int = 512
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    temperature: float = 1.0
    prompt_share: int = 1
    head_chunk_elements: int = DEFAULT_HEAD_CHUNK_ELEMENTS

    def __attrs_post_init__(self):
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)
        problems: list[str] = []

        def _require(ok, field, value, what):  # every problem is reported, not only the first
            if not ok:
                problems.append(f"{field} must be {what}, got {field}={value!r}")

        _require(_finite(self.epsilon) and self.epsilon > 0, "epsilon", self.epsilon, "> 0")
        _require(
            _finite(self.epsilon_high) and self.epsilon_high > 0,
            "epsilon_high",
            self.epsilon_high,
            "> 0",
        )
        if self.delta is not None:
            _require(_finite(self.delta) and self.delta > 1, "delta", self.delta, "None or > 1")
        _require(_finite(self.beta) and self.beta >= 0, "beta", self.beta, ">= 0")
        q = self.top_entropy_quantile
        _require(_finite(q) and 0 <= q <= 1, "top_entropy_quantile", q, "in [0, 1]")
        t = self.off_policy_mask_threshold
        if t is not None:
            _require(_finite(t) and t >= 0, "off_policy_mask_threshold", t, "None or >= 0")
        c = self.entropy_coef
        _require(_finite(c) and c >= 0, "entropy_coef", c, ">= 0")
        n = self.max_completion_length
        _require(isinstance(n, int) and n > 0, "max_completion_length", n, "an integer >= 1")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            v = getattr(self, name)
            _require(_finite(v) and v > 0, name, v, "> 0")
        for name in ("vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            v = getattr(self, name)
            _require(_finite(v) and v >= 0, name, v, ">= 0")
        n = self.head_chunk_elements
        _require(isinstance(n, int) and n > 0, "head_chunk_elements", n, "a positive int")
        _require(
            _finite(self.temperature) and self.temperature > 0,
            "temperature",
            self.temperature,
            "> 0",
        )
        if problems:
            raise ValueError("\n  - ".join(problems))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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

_LOG_WEIGHTS = {"token": token_log_weights, "sequence": sequence_log_weights}

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


# ------------------------------------------------------------------ factory

PolicyLoss = Callable[..., tuple[mx.array, Metrics]]


def _check_shapes(logprobs, advantages, mask, optional: dict) -> None:
    if logprobs.ndim != 2 or tuple(mask.shape) != tuple(logprobs.shape):
        raise ValueError(
            f"policy_loss: logprobs and mask must both be [N, T]; got logprobs.shape="
            f"{tuple(logprobs.shape)}, mask.shape={tuple(mask.shape)}"
        )
    if tuple(advantages.shape) != tuple(logprobs.shape[:1]):
        raise ValueError(
            f"policy_loss: advantages must be [N]={tuple(logprobs.shape[:1])}; got "
            f"advantages.shape={tuple(advantages.shape)}"
        )
    for name, x in optional.items():
        if x is not None and tuple(x.shape) != tuple(logprobs.shape):
            raise ValueError(
                f"policy_loss: {name} must match logprobs {tuple(logprobs.shape)}; got "
                f"{name}.shape={tuple(x.shape)}"
            )


def _check_sampler_ratio(logprobs, ratio) -> None:
    N, T = logprobs.shape
    if ratio is not None and tuple(ratio.shape) not in ((N, T), (N, 1)):
        raise ValueError(
            f"policy_loss: sampler_ratio must be [N, T]={(N, T)} or [N, 1]={(N, 1)}; got "
            f"sampler_ratio.shape={tuple(ratio.shape)}"
        )


def _kl_term(cfg: LossConfig):
    if cfg.beta == 0:
        return None

    def kl(t: Terms, ref_logprobs):
        if ref_logprobs is None:
            raise ValueError(f"policy_loss: LossConfig.beta={cfg.beta} needs ref_logprobs")
        ratio = t.ratio if cfg.use_bias_correction_kl else None
        return kl_k3(t.logprobs, ref_logprobs.astype(mx.float32), ratio)

    return kl


def _off_policy_filter(cfg: LossConfig):
    if cfg.off_policy_mask_threshold is None:
        return None
    thr = cfg.off_policy_mask_threshold
    return lambda t, old: off_policy_mask(t.advantages, t.logprobs, old, t.mask, threshold=thr)


def _entropy_filter(cfg: LossConfig):
    if cfg.top_entropy_quantile >= 1.0:
        return None
    q = 1.0 - cfg.top_entropy_quantile
    return lambda entropies, mask: high_entropy_mask(_need(entropies, cfg), mask, quantile=q)


def _need(entropies, cfg):
    if entropies is None:
        raise ValueError(
            "policy_loss: entropies are required when LossConfig.top_entropy_quantile="
            f"{cfg.top_entropy_quantile} < 1 or an entropy bonus is on (entropy_coef="
            f"{cfg.entropy_coef})"
        )
    return entropies.astype(mx.float32)


def _terms(logprobs, advantages, mask, old_logprobs, log_weights) -> tuple[Terms, mx.array]:
    logprobs = logprobs.astype(mx.float32)
    mask = mask.astype(mx.float32)
    old = mx.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
    old = old.astype(mx.float32)
    log_ratio = logprobs - old
    ratio = mx.exp(log_weights(log_ratio, mask))
    return Terms(logprobs, log_ratio, ratio, advantages.astype(mx.float32)[:, None], mask), old


def make_policy_loss(
    cfg: LossConfig, *, surrogate: Surrogate | None = None, reduction: Reduction | None = None
) -> PolicyLoss:
    """Build the policy loss for ``cfg``; variants are chosen here, not inside the maths.

    Args:
        cfg: the :class:`LossConfig`; ``cfg.loss_type`` picks the surrogate and reduction
            from :data:`LOSSES`.
        surrogate: a surrogate of your own, ``f(t: Terms) -> (per_token_loss [N, T] or
            [N, 1], metrics)``, used instead of the loss type's (KL, masks and the entropy
            bonus still apply).
        reduction: a reduction of your own, ``f(per_token_loss, mask, num_items) -> loss``.

    Returns:
        ``loss_fn(logprobs, advantages, mask, *, old_logprobs=None, ref_logprobs=None,
        entropies=None, num_items_in_batch=None, entropy_coef=None, sampling_logprobs=None,
        sampler_ratio=None) -> (loss, metrics)``; see :func:`policy_loss` for the arguments.
    """
    log_weights = _LOG_WEIGHTS[cfg.importance_sampling_level]
    row = LOSSES[cfg.loss_type]
    # VESPO folds the sampler correction into its Gamma weight; other losses multiply by it.
    weigh_by_sampler = surrogate is not None or cfg.loss_type != "vespo"
    surrogate = surrogate or row.surrogate(cfg)
    reduce = reduction or row.reduction(cfg)
    kl_term = _kl_term(cfg)
    off_policy = _off_policy_filter(cfg)
    top_entropy = _entropy_filter(cfg)

    def loss_fn(
        logprobs,
        advantages,
        mask,
        *,
        old_logprobs=None,
        ref_logprobs=None,
        entropies=None,
        num_items_in_batch=None,
        entropy_coef=None,
        sampling_logprobs=None,
        sampler_ratio=None,
    ):
        optional = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, entropies=entropies)
        _check_shapes(
            logprobs, advantages, mask, {**optional, "sampling_logprobs": sampling_logprobs}
        )
        _check_sampler_ratio(logprobs, sampler_ratio)
        t, old = _terms(logprobs, advantages, mask, old_logprobs, log_weights)
        t = t._replace(sampler_ratio=sampler_ratio)
        per_token, metrics = surrogate(t)
        if off_policy is not None:
            # TRL's mask reads the sampler's own log-probs when another engine sampled.
            seen = old if sampling_logprobs is None else sampling_logprobs.astype(mx.float32)
            per_token = per_token * off_policy(t, seen)
        # The entropy bonus acts on the same tokens as the policy term (TRL's effective_mask).
        bonus_mask = t.mask
        if top_entropy is not None:
            bonus_mask = t.mask * top_entropy(entropies, t.mask)
            per_token = per_token * bonus_mask
        if sampler_ratio is not None and weigh_by_sampler:
            per_token = per_token * sampler_ratio
        per_token = mx.broadcast_to(per_token, t.mask.shape)
        if kl_term is not None:
            kl = kl_term(t, ref_logprobs)
            per_token = per_token + cfg.beta * kl
            metrics["kl"] = masked_mean(kl, t.mask)
        n_items = t.mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = reduce(per_token, t.mask, n_items)
        if entropies is not None:
            metrics["entropy"] = masked_mean(entropies.astype(mx.float32), t.mask)
        if cfg.entropy_coef != 0 or entropy_coef is not None:
            coef = cfg.entropy_coef if entropy_coef is None else entropy_coef
            metrics["policy_loss"] = mx.stop_gradient(loss)
            h = _need(entropies, cfg)
            loss = loss - coef * masked_mean(h, bonus_mask)
            if entropy_coef is not None:
                # The adaptive controller's measurement: entropy summed over the bonus tokens.
                metrics["entropy/bonus_sum"] = mx.stop_gradient((h * bonus_mask).sum())
                metrics["entropy/bonus_tokens"] = bonus_mask.sum()
        return loss.astype(mx.float32), metrics

    return loss_fn


def policy_loss(
    logprobs: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    old_logprobs: mx.array | None = None,
    ref_logprobs: mx.array | None = None,
    entropies: mx.array | None = None,
    num_items_in_batch: mx.array | float | None = None,
    entropy_coef: mx.array | float | None = None,
    sampling_logprobs: mx.array | None = None,
    sampler_ratio: mx.array | None = None,
    cfg: LossConfig,
) -> tuple[mx.array, Metrics]:
    """GRPO-family policy loss of TRL 1.16 (DeepSeekMath eq. 3 and its descendants).

    .. math:: \\mathcal{L} = \\operatorname{reduce}\\big[m \\cdot (M\\,\\rho\\,\\ell(r, A)
              + \\beta\\,\\mathrm{KL}_{k3})\\big] - c_H \\bar H

    where ``M`` is the product of the off-policy and high-entropy masks when enabled and
    ``rho`` the sampler correction (``sampler_ratio``, 1 when absent).

    Args:
        logprobs: ``[N, T]`` current per-token log-probs (the differentiable input).
        advantages: ``[N]`` one advantage per completion.
        mask: ``[N, T]`` 1 on completion tokens that train, 0 on padding.
        old_logprobs: ``[N, T]`` log-probs at sampling time; ``None`` means
            ``stop_gradient(logprobs)`` (single-iteration GRPO, ratio exactly 1).
        ref_logprobs: ``[N, T]`` reference-model log-probs; required when ``cfg.beta != 0``.
        entropies: ``[N, T]`` per-token entropies; required for ``top_entropy_quantile < 1``
            and the entropy bonus; gives the ``entropy`` metric when present.
        num_items_in_batch: scalar, active-token count of the whole accumulated generation
            batch (TRL's ``num_items_in_batch``), the denominator of dapo/cispo/vespo;
            ``None`` means ``mask.sum()``. A trainer that averages ``k`` micro-batch losses
            per optimizer step should pass the count divided by ``k``.
        entropy_coef: run-time override of ``cfg.entropy_coef`` (for an adaptive
            controller); passing it enables the bonus even when ``cfg.entropy_coef == 0``.
        sampling_logprobs: ``[N, T]`` log-probs of a sampler other than the policy (a
            quantized copy); the off-policy mask reads them instead of ``old_logprobs``.
        sampler_ratio: ``[N, T]`` or ``[N, 1]`` TRL's sampler-mismatch weight
            (:func:`grpo.core.importance.sampler_correction`); the per-token loss is
            multiplied by it (VESPO adds its log to the Gamma weight's ``log w`` instead).
        cfg: the :class:`LossConfig`.

    Returns:
        ``(loss, metrics)``: float32 scalar loss and a dict of float32 scalars named as in
        TRL (``kl`` when ``beta != 0``; ``entropy`` when ``entropies`` are given;
        ``clip_ratio/*`` for clipped types; ``cispo_clip_ratio``; ``vespo/phi_seq_mean``;
        ``policy_loss`` when the entropy bonus is on). Cross-process min/max are local here.
    """
    return make_policy_loss(cfg)(
        logprobs,
        advantages,
        mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        entropies=entropies,
        num_items_in_batch=num_items_in_batch,
        entropy_coef=entropy_coef,
        sampling_logprobs=sampling_logprobs,
        sampler_ratio=sampler_ratio,
    )


# -------------------------------------------------------------- model level


def completion_logprobs(
    model,
    params,
    batch: LossBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    prompt_share: int = 1,
    max_chunk_elements: int = DEFAULT_HEAD_CHUNK_ELEMENTS,
):
    """Log-probs of each completion token, with logits only at completion positions.

    .. math:: \\log\\pi_\\theta(c_{i,t} \\mid x_{i, < s_i + t}), \\quad s_i = \\text{completion\\_start}_i

    Runs the model's trunk on ``batch.input_ids``, gathers the hidden states at positions
    ``s_i - 1 + t`` (the ones that predict completion token ``t``) and applies the model's
    own head only there (:mod:`grpo.core.lm`), a chunk of positions at a time with the
    logits recomputed in the backward (:func:`grpo.core.logprobs.head_logprobs`): nothing
    of size ``[N, T, V]`` is formed in either pass. A model whose trunk/head split was not
    verified equal to its own forward is scored by that full forward instead (its
    ``[N, P + T, V]`` logits, then a chunked log-softmax). The one place where the model
    object meets the parameter arrays.

    Args:
        model: an mlx-lm causal LM; updated in place with ``params``.
        params: parameter tree for ``model.update`` (all weights, or only the trainable
            ones, e.g. LoRA adapters, on top of the frozen rest).
        batch: a :class:`LossBatch`; needs ``input_ids [N, P+T]``, ``completion_start [N]``
            (``>= 1``) and ``completion_ids [N, T]``.
        temperature: log-probs are taken under ``softmax(logits / temperature)``.
        with_entropy: also return per-token entropies.
        prompt_share: rows ``j*k .. j*k+k-1`` (``k = prompt_share``) hold the same prompt;
            with ``k > 1`` each prompt runs once (:mod:`grpo.core.shared_prompt`) when the
            model supports it, else the packed forward runs. Same result either way.
        max_chunk_elements: logits elements per head chunk (``positions * V``).

    Returns:
        ``logprobs [N, T]`` float32, or ``(logprobs, entropies)`` with ``with_entropy``.
    """
    model.update(params)
    N, T = batch.completion_ids.shape
    # Row i's completion token t sits at s_i + t and is predicted from position s_i + t - 1.
    pos = batch.completion_start.astype(mx.int32)[:, None] - 1 + mx.arange(T)[None, :]
    if not split_ok(model):
        logits = completion_logits(model, batch.input_ids, pos)
        if with_entropy:
            return token_logprobs_and_entropy(logits, batch.completion_ids, temperature=temperature)
        return token_logprobs(logits, batch.completion_ids, temperature=temperature)
    hidden = _completion_hidden(model, batch, pos, prompt_share)
    weights = head_parameters(model, hidden)
    V = _vocab_size(model, hidden)
    return head_logprobs(
        make_head_fn(model, [p for p, _ in weights]),
        hidden,
        batch.completion_ids,
        [w for _, w in weights],
        temperature=temperature,
        with_entropy=with_entropy,
        chunk_rows=head_chunk_rows(V, max_chunk_elements),
    )


def _vocab_size(model, hidden: mx.array) -> int:
    # Shape inference only: the one-position head call below is never evaluated.
    return head(model, hidden[:1, :1]).shape[-1]


def _completion_hidden(model, batch: LossBatch, pos: mx.array, prompt_share: int) -> mx.array:
    N = batch.completion_ids.shape[0]
    if can_share(model, N, prompt_share):
        return shared_prompt_hidden(
            model,
            batch.input_ids,
            batch.completion_start,
            batch.completion_ids,
            share=prompt_share,
        )
    h = trunk(model)(batch.input_ids)
    return mx.take_along_axis(h, pos[..., None], axis=1)


def lora_reference_params(params):
    """The LoRA reference policy: the same adapter tree with every ``lora_b`` zeroed.

    With ``lora_b = 0`` each LoRA layer's update ``scale * (x A) B`` is exactly zero, so
    ``model.update(lora_reference_params(adapters))`` makes the model compute the frozen
    base weights' outputs. Only adapter-sized zeros are allocated; base weights are shared.

    Args:
        params: tree holding mlx-lm ``LoRALinear`` adapters (``lora_a``/``lora_b`` leaves).

    Returns:
        A tree with the same structure.

    Raises:
        ValueError: if ``params`` has no ``lora_b`` leaf (a full fine-tune needs an explicit
            reference copy) or holds DoRA magnitudes (``m``), which zeroing cannot undo.
    """
    paths = [path for path, _ in tree_flatten(params)]
    if not any(p.endswith("lora_b") for p in paths):
        raise ValueError(
            "lora_reference_params: params has no `lora_b` leaves (got e.g. "
            f"{paths[:3]}); pass an explicit reference tree for a full fine-tune"
        )
    dora = [p for p in paths if p.endswith(".m")]
    if dora:
        raise ValueError(
            f"lora_reference_params: DoRA magnitudes such as {dora[0]!r} cannot be switched "
            "off by zeroing lora_b; pass an explicit reference tree"
        )
    return tree_map_with_path(lambda p, x: mx.zeros_like(x) if p.endswith("lora_b") else x, params)


def _reference_logprobs(model, ref_params, batch: LossBatch, cfg: LossConfig):
    if cfg.beta == 0:
        return None
    if ref_params is not None and batch.ref_logprobs is not None:
        raise ValueError(
            "grpo_loss: got both ref_params and batch.ref_logprobs; pass exactly one reference"
        )
    if ref_params is None:
        if batch.ref_logprobs is None:
            raise ValueError(
                f"grpo_loss: beta={cfg.beta} needs a reference: pass ref_params (for LoRA, "
                "lora_reference_params(adapters)) or batch.ref_logprobs, or set beta=0"
            )
        return batch.ref_logprobs
    logp = completion_logprobs(
        model,
        ref_params,
        batch,
        temperature=cfg.temperature,
        prompt_share=cfg.prompt_share,
        max_chunk_elements=cfg.head_chunk_elements,
    )
    return mx.stop_gradient(logp)


def grpo_loss(params, ref_params, batch: LossBatch, *, model, cfg: LossConfig):
    """The GRPO objective of a model on one :class:`LossBatch`: forward, log-probs, loss.

    .. math:: \\mathcal{L}(\\theta) = \\texttt{policy\\_loss}\\big(\\log\\pi_\\theta(c \\mid x),
              A, m;\\ \\log\\pi_{old}, \\log\\pi_{ref}, H\\big)

    Reference rule (KL term only when ``cfg.beta != 0``): ``ref_params`` given -> a
    stop-gradient forward of ``model`` with ``ref_params`` (for LoRA, pass
    :func:`lora_reference_params` of the adapters); else ``batch.ref_logprobs``. Passing
    both, or neither while ``beta != 0``, raises (as :func:`policy_loss` does).

    ``batch.old_logprobs`` ``None`` means the detached current log-probs (ratio 1);
    ``batch.num_items_in_batch`` ``None`` means this batch's active-token count.

    Args:
        params: trainable parameter tree (the differentiated argument).
        ref_params: reference parameter tree or ``None``.
        batch: the :class:`LossBatch`.
        model: the mlx-lm model (closed over; updated in place).
        cfg: :class:`LossConfig` (its ``temperature`` scales the logits).

    Returns:
        ``(loss, metrics)`` as :func:`policy_loss`; ``entropy`` is always included.
    """
    ref_logprobs = _reference_logprobs(model, ref_params, batch, cfg)
    logprobs, entropies = completion_logprobs(
        model,
        params,
        batch,
        temperature=cfg.temperature,
        with_entropy=True,
        prompt_share=cfg.prompt_share,
        max_chunk_elements=cfg.head_chunk_elements,
    )
    return make_policy_loss(cfg)(
        logprobs,
        batch.advantages,
        batch.completion_mask,
        old_logprobs=batch.old_logprobs,
        ref_logprobs=ref_logprobs,
        entropies=entropies,
        num_items_in_batch=batch.num_items_in_batch,
        entropy_coef=batch.entropy_coef,
        sampling_logprobs=batch.sampling_logprobs,
        sampler_ratio=batch.sampler_ratio,
    )
