"""From a :class:`~grpo.core.rollout.Rollout` to the micro-batches of a train step.

The pieces ``GRPOTrainer`` runs between generation and the update, public so that a custom
loop uses exactly the same ones:

.. code-block:: python

    roll = pad_rollout(roll, max_completion=T)                  # bucketed shapes
    batch = loss_batch(roll, adv.advantages)                    # packed LossBatch
    batch = batch._replace(ref_logprobs=per_micro(logp_fn, ref_params, batch, micro=n))
    # sampled by a quantized copy (rollout_quantization): float old log-probs, TRL's weight
    batch = batch._replace(old_logprobs=per_micro(logp_fn, params, batch, micro=n))
    batch = correct_sampler(batch, roll.logprobs)
    for window in micro_batches(batch, micro=n, K=k):           # [K, n, ...] each
        state, metrics = train_step(state, window)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from grpo.core.batch import LossBatch, pack
from grpo.core.importance import sampler_correction
from grpo.core.rollout import Rollout
from grpo.core.step import bucket_length


def pad_right(x: mx.array, length: int, value: float | int = 0) -> mx.array:
    """``[N, L]`` -> ``[N, max(L, length)]``, padded on the right with ``value``."""
    extra = length - x.shape[1]
    return x if extra <= 0 else mx.pad(x, [(0, 0), (0, extra)], constant_values=value)


def pad_rollout(
    roll: Rollout, *, multiple: int | None = None, max_completion: int | None = None
) -> Rollout:
    """``roll`` with prompt and completion lengths padded to buckets (:func:`bucket_length`),
    so a compiled step sees a small set of shapes.

    Args:
        roll: a rollout (``prompt_ids [N, P]``, ``completion_ids [N, T]``, ...).
        multiple: pad to a multiple of this (``None``: the next power of two).
        max_completion: never pad completions past this (``max_completion_length``).
    """
    T = bucket_length(roll.completion_ids.shape[1], multiple=multiple, cap=max_completion)
    P = bucket_length(roll.prompt_ids.shape[1], multiple=multiple)
    return roll._replace(
        prompt_ids=pad_right(roll.prompt_ids, P),
        completion_ids=pad_right(roll.completion_ids, T),
        logprobs=pad_right(roll.logprobs, T, 0.0),
        completion_mask=pad_right(roll.completion_mask, T, 0.0),
    )


def loss_batch(
    roll: Rollout,
    advantages: mx.array,
    *,
    tool_mask: mx.array | None = None,
    mask_truncated: bool = False,
) -> LossBatch:
    """The :class:`LossBatch` of a rollout: packed ``prompt ++ completion`` rows.

    Args:
        roll: a (padded) rollout of ``N`` rows.
        advantages: ``[N]`` one advantage per completion.
        tool_mask: ``[N, T]`` 0 on tokens the model did not sample (tool results, template
            glue); they never train, neither in the surrogate nor in the KL.
        mask_truncated: drop completions that hit the length budget (DAPO).

    Returns:
        A batch without ``ref_logprobs`` / ``old_logprobs`` (see :func:`per_micro`).
    """
    mask = roll.completion_mask
    if tool_mask is not None:
        mask = mask * tool_mask
    if mask_truncated:
        mask = mask * (~roll.is_truncated)[:, None].astype(mask.dtype)
    return LossBatch(
        input_ids=pack(roll.prompt_ids, roll.prompt_lengths, roll.completion_ids),
        completion_start=roll.prompt_lengths.astype(mx.int32),
        completion_ids=roll.completion_ids,
        completion_mask=mask,
        advantages=advantages.astype(mx.float32),
    )


def correct_sampler(
    batch: LossBatch,
    sampling_logprobs: mx.array,
    *,
    correction: bool = True,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> LossBatch:
    """``batch``, sampled by an engine other than its policy, with TRL's correction.

    .. math:: \\rho = \\texttt{sampler\\_correction}(\\log\\pi_{old}, \\log\\pi_{samp}, m)

    TRL 1.16's vLLM importance sampling (``vllm_importance_sampling_*``): the loss
    multiplies its per-token terms by ``rho`` (:func:`grpo.core.importance.sampler_correction`).

    Args:
        batch: a :class:`LossBatch` whose ``old_logprobs [N, T]`` come from the float
            policy at sampling time (never from the sampler).
        sampling_logprobs: ``[N, T]`` the sampler's log-probs of the same tokens (NaN where
            it could not score one: ratio 1 there).
        correction: ``False`` keeps the sampler's log-probs (for the off-policy mask) but
            applies no weight (TRL's ``vllm_importance_sampling_correction=False``).
        mode, clip_min, clip_max: TRL's ``vllm_importance_sampling_mode`` and bounds.

    Returns:
        ``batch`` with ``sampling_logprobs`` and ``sampler_ratio`` (``[N, T]`` for token
        modes, ``[N, 1]`` for sequence modes; ``None`` without ``correction``).
    """
    if batch.old_logprobs is None:
        raise ValueError(
            "correct_sampler: batch.old_logprobs is None; compute them with the float "
            "policy first (per_micro), the correction is pi_old / pi_samp"
        )
    ratio = None
    if correction:
        ratio = sampler_correction(
            batch.old_logprobs,
            sampling_logprobs,
            batch.completion_mask,
            mode=mode,
            clip_min=clip_min,
            clip_max=clip_max,
        )
    return batch._replace(sampling_logprobs=sampling_logprobs, sampler_ratio=ratio)


def batch_rows(batch: LossBatch, start: int, stop: int) -> LossBatch:
    """Rows ``start:stop`` of every per-row field (scalars are kept as they are)."""
    return LossBatch(*(None if x is None or x.ndim == 0 else x[start:stop] for x in batch))


def per_micro(
    fn: Callable[[Any, LossBatch], mx.array], params: Any, batch: LossBatch, *, micro: int
) -> mx.array:
    """``fn(params, rows)`` over ``micro``-row slices of ``batch``, concatenated: the
    reference or old log-probs ``[N, T]`` computed in the step's micro-batch shapes."""
    N = batch.input_ids.shape[0]
    parts = []
    for s in range(0, N, micro):
        # One micro-batch evaluated at a time: its activations are freed before the next.
        parts.append(fn(params, batch_rows(batch, s, s + micro)))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=0)


def micro_batches(batch: LossBatch, *, micro: int, K: int) -> list[LossBatch]:
    """Split ``N`` rows into optimizer steps of ``K`` micro-batches of ``micro`` rows.

    Returns:
        ``N / (micro * K)`` batches whose every field has a leading axis ``K`` (what
        :func:`grpo.core.step.make_train_step` takes).
    """
    N = batch.input_ids.shape[0]
    S = N // micro
    if S * micro != N or S % K:
        raise ValueError(
            f"micro_batches: N={N} rows do not split into steps of K={K} micro-batches of "
            f"micro={micro} rows"
        )

    def split(x):
        return None if x is None else x.reshape(S, micro, *x.shape[1:])

    stacked = LossBatch(*(split(x) for x in batch))
    return [
        LossBatch(*(None if x is None else x[w * K : (w + 1) * K] for x in stacked))
        for w in range(S // K)
    ]
