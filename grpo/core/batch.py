"""The arrays one loss evaluation needs, and packing prompts with completions.

``input_ids`` rows are ``prompt ++ completion`` followed by right padding, so every row's
positions start at 0 and plain causal attention needs no padding mask: pad tokens only
ever sit *after* the tokens that are scored, so they cannot influence them.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class LossBatch(NamedTuple):
    """One batch for :func:`grpo.core.loss.grpo_loss`.

    Optional fields are ``None`` when absent. ``mx.compile`` treats ``None`` as part of the
    argument's structure, not as a value, so each combination of present/absent fields
    traces once and the choice never varies inside compiled code.
    """

    input_ids: (
        mx.array
    )  # [N, P+T] int32, row i = prompt_i[:completion_start_i] ++ completion_i ++ pad
    completion_start: mx.array  # [N] int32, prompt length = index of the first completion token
    completion_ids: mx.array  # [N, T] int32, pad after EOS
    completion_mask: mx.array  # [N, T] float32, 1 on tokens that train
    advantages: mx.array  # [N] float32
    old_logprobs: mx.array | None = (
        None  # [N, T] float32 sampling-time log-probs; None = current, detached
    )
    ref_logprobs: mx.array | None = (
        None  # [N, T] float32 precomputed reference log-probs; None = absent
    )
    num_items_in_batch: mx.array | None = (
        None  # [] active tokens of the generation batch (dapo/cispo/vespo)
    )
    entropy_coef: mx.array | None = (
        None  # [] run-time entropy-bonus coefficient (adaptive control); None = the config's
    )
    sampling_logprobs: mx.array | None = (
        None  # [N, T] float32 log-probs of a sampler other than the policy; None = the policy
    )
    sampler_ratio: mx.array | None = (
        None  # [N, T] or [N, 1] TRL's sampler-mismatch weight pi_old / pi_samp; None = off
    )


def pack(
    prompt_ids: mx.array, prompt_lengths: mx.array, completion_ids: mx.array, *, pad_id: int = 0
) -> mx.array:
    """Concatenate each row's real prompt tokens with its completion, right-padded.

    .. math:: x_{i,j} = \\begin{cases} p_{i,j} & j < \\ell_i \\\\ c_{i,j-\\ell_i} & \\ell_i \\le j < \\ell_i + T
              \\\\ \\text{pad} & \\text{otherwise} \\end{cases}

    Args:
        prompt_ids: ``[N, P]`` right-padded prompts.
        prompt_lengths: ``[N]`` real prompt lengths ``1 <= l_i <= P``.
        completion_ids: ``[N, T]`` completions (their own padding is kept).
        pad_id: token written after each row's completion.

    Returns:
        ``[N, P+T]`` input ids with the same dtype as ``prompt_ids``.
    """
    N, P = prompt_ids.shape
    if completion_ids.ndim != 2 or completion_ids.shape[0] != N or prompt_lengths.shape != (N,):
        raise ValueError(
            f"pack: expected prompt_ids [N, P], prompt_lengths [N], completion_ids [N, T]; got "
            f"{tuple(prompt_ids.shape)}, {tuple(prompt_lengths.shape)}, {tuple(completion_ids.shape)}"
        )
    T = completion_ids.shape[1]
    j = mx.arange(P + T)[None, :]
    start = prompt_lengths.astype(mx.int32)[:, None]
    prompt_idx = mx.broadcast_to(mx.minimum(j, P - 1), (N, P + T))
    from_prompt = mx.take_along_axis(prompt_ids, prompt_idx, axis=1)
    from_completion = mx.take_along_axis(completion_ids, mx.clip(j - start, 0, T - 1), axis=1)
    out = mx.where(j < start, from_prompt, mx.where(j < start + T, from_completion, pad_id))
    return out.astype(prompt_ids.dtype)
