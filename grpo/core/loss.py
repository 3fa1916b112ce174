"""The GRPO policy-loss family of TRL 1.16, as small functions chosen by a factory.

.. math::

    \\mathcal{L}(\\theta) = \\operatorname{reduce}_{i,t}\\Big[
        m_{i,t}\\,\\ell\\big(r_{i,t}(\\theta), A_i\\big)
        + \\beta\\, \\mathrm{KL}_{k3}\\big(\\pi_\\theta \\,\\|\\, \\pi_{\\mathrm{ref}}\\big)_{i,t}\\Big]
        - c_H\\, \\bar H

with the importance ratio :math:`r = \\pi_\\theta / \\pi_{\\mathrm{old}}` per token or, for GSPO
(``importance_sampling_level="sequence"``), :math:`\\exp` of the masked mean log-ratio of
each sequence. The surrogate :math:`\\ell` and the ``reduce`` step are picked once by
:func:`make_policy_loss` from :class:`LossConfig`, through the table of loss types
:data:`grpo.core.surrogates.LOSSES` (or passed in: a surrogate or reduction of your own).

This module is the configuration and the assembly: :class:`LossConfig` and its checks,
:func:`make_policy_loss` / :func:`policy_loss` over log-prob arrays, and :func:`grpo_loss`
over a model and a :class:`grpo.core.batch.LossBatch`. The array pieces live in
:mod:`grpo.core.surrogates`, the model forward in :mod:`grpo.core.forward`; both are
re-exported here. Everything is pure: arrays in, ``(loss, metrics)`` out, traceable by
``mx.compile`` and ``mx.value_and_grad`` (config values are Python constants closed over at
build time).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import mlx.core as mx

from grpo.core.batch import LossBatch
from grpo.core.forward import completion_logprobs, lora_reference_params
from grpo.core.logprobs import DEFAULT_HEAD_CHUNK_ELEMENTS
from grpo.core.numerics import masked_mean
from grpo.core.surrogates import (
    CLIPPED_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    LOG_WEIGHTS,
    LOSS_TYPES,
    LOSSES,
    LossType,
    Metrics,
    Reduction,
    Surrogate,
    Terms,
    cispo_surrogate,
    clip_metrics,
    clipped_surrogate,
    gamma_weights,
    global_token_reduction,
    high_entropy_mask,
    kl_k3,
    off_policy_mask,
    sapo_surrogate,
    sequence_log_weights,
    sequence_mean_reduction,
    sequence_sum_reduction,
    token_log_weights,
    token_mean_reduction,
    vespo_surrogate,
)

# The pieces above stay importable from here (``grpo.core.loss.kl_k3`` and so on).
__all__ = [
    "LossConfig", "PolicyLoss", "make_policy_loss", "policy_loss", "grpo_loss",
    "completion_logprobs", "lora_reference_params",
    "CLIPPED_LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "LOSSES", "LossType",
    "Metrics", "Reduction", "Surrogate", "Terms", "cispo_surrogate", "clip_metrics",
    "clipped_surrogate", "gamma_weights", "global_token_reduction", "high_entropy_mask",
    "kl_k3", "off_policy_mask", "sapo_surrogate", "sequence_log_weights",
    "sequence_mean_reduction", "sequence_sum_reduction", "token_log_weights",
    "token_mean_reduction", "vespo_surrogate",
]  # fmt: skip


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
            this); the forward then runs each prompt once (:mod:`grpo.core.shared_prefix`).
            1 (default) makes no assumption. The trainer sets
            ``gcd(per_device_train_batch_size, num_generations)``.
        head_chunk_elements: logits elements (``positions * V``) the LM head forms at
            once in the loss; bounds the head's memory, not its result.
    """

    loss_type: str = attrs.field(default="dapo", validator=_one_of(LOSS_TYPES))
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
            if isinstance(value, float) and not math.isfinite(value):
                what = "a finite number"  # inf passes ">= 0"; nan fails it with a vaguer message
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
        n = self.prompt_share
        _require(isinstance(n, int) and n > 0, "prompt_share", n, "an integer >= 1")
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
    log_weights = LOG_WEIGHTS[cfg.importance_sampling_level]
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
