"""The training forward with each prompt computed once per block of rows that share it.

GRPO scores ``G`` completions of the same prompt, and :func:`grpo.core.batch.pack` lays
every row out as ``prompt ++ completion``, so a plain forward runs the prompt ``G`` times.
Here the trunk runs once on the block's prompt (recording each layer's keys/values), then
once on the ``k`` rows' completions with attention over that shared prefix, and the
hidden states that predict each completion token are stitched together:

.. math:: h_{i,0} = h^{\\text{prompt}}_{b, \\ell_b - 1}, \\qquad
          h_{i,t} = h^{\\text{completion}}_{i, t - 1} \\ (t \\ge 1)

It is the same function as the packed forward (tested to float32 rounding, values and
gradients): completion positions see the prompt's keys/values at ``< l_b`` and their own
earlier completion positions; RoPE positions are ``l_b + t``. Gradients reach the prompt
through its keys/values and through ``h_{i,0}``.

Only a model whose attention reads prefix caches (:func:`grpo.core.rollout.shares_prefix`,
i.e. grpo's CPU kernels are installed) and whose blocks are not gradient-checkpointed can
take this path; :func:`grpo.core.forward.completion_logprobs` falls back to the packed
forward otherwise.

Names: the decode side keeps a group's prompt once in a
:class:`grpo.core.kv_cache.SharedPrefixKVCache`; the training forward here records it with a
:class:`grpo.core.kv_cache.PrefixRecorder` and reads it through a
:class:`grpo.core.kv_cache.SharedPrefixTrainCache`. Both need
:func:`grpo.core.rollout.shares_prefix` (the attention reads prefix caches) and
:func:`prefix_sharing_verified` (:func:`check_prefix_sharing` found the result unchanged).
"""

from __future__ import annotations

import weakref

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from grpo.core.kv_cache import PrefixRecorder, SharedPrefixTrainCache
from grpo.core.lm import cached_verdict, split_ok, trunk
from grpo.core.rollout import shares_prefix

_VERDICT: dict[int, bool] = {}  # id(model) -> shared prompts verified equal to packed rows


def _structurally_shareable(model) -> bool:
    # Attention that reads prefix caches, and a plain KVCache per layer (no sliding window,
    # SSM or other state a prompt pass would have to hand over).
    return shares_prefix(model) and all(type(c) is KVCache for c in make_prompt_cache(model))


def check_prefix_sharing(model, *, atol: float = 1e-4) -> bool:
    """True when :func:`shared_prefix_hidden` equals the packed trunk on a tiny batch.

    Some attention variants pass data through the mask (multi-head latent attention adds
    its RoPE scores there), which a prefix cache cannot carry; they fail here and keep
    the packed forward and a per-row decode cache. Evaluates eagerly and records the
    verdict, which :func:`prefix_sharing_verified` (read by the training forward and the
    rollout) returns.
    """
    ok = _structurally_shareable(model) and split_ok(model)
    if ok:
        was_training = model.training
        model.eval()
        try:
            ids = mx.array([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8, 9, 10]], dtype=mx.int32)
            start = mx.array([4, 4], dtype=mx.int32)
            try:
                shared = shared_prefix_hidden(model, ids, start, ids[:, 4:], share=2)
            except Exception:  # noqa: BLE001  (an attention that cannot take the prefix)
                shared = None
            packed = trunk(model)(ids)[:, 3:6]
            ok = shared is not None and tuple(shared.shape) == tuple(packed.shape)
            ok = ok and bool(mx.allclose(shared, packed, atol=atol, rtol=0))
        finally:
            model.train(was_training)
    if id(model) not in _VERDICT:
        weakref.finalize(model, _VERDICT.pop, id(model), None)
    _VERDICT[id(model)] = ok
    return ok


def prefix_sharing_verified(model) -> bool:
    """The recorded :func:`check_prefix_sharing` verdict; checks now (eagerly) if none.

    Inside a traced function an unchecked model cannot be evaluated and gets False. The
    verdict holds while grpo's attention is installed in the model's module (it can be
    switched off and on again, :func:`grpo.io.fast_attention.install_fast_kernels`).
    """
    if not shares_prefix(model):
        return False
    return cached_verdict(_VERDICT, model, check_prefix_sharing)


def can_share_prefix(model, N: int, share: int) -> bool:
    """True when blocks of ``share`` rows can run :func:`shared_prefix_hidden` on ``model``:
    sharing was verified for it (:func:`prefix_sharing_verified`) and its blocks are not
    checkpointed."""
    if share <= 1 or N % share or not shares_prefix(model):
        return False
    if any(getattr(layer, "grpo_checkpointed", False) for layer in trunk(model).layers):
        return False
    return prefix_sharing_verified(model)


def shared_prefix_hidden(model, input_ids, completion_start, completion_ids, *, share: int):
    """Hidden states ``[N, T, D]`` that predict each completion token, prompts run once.

    Args:
        model: an mlx-lm causal LM with its parameters set (:func:`grpo.core.lm.trunk`).
        input_ids: ``[N, P + T]`` packed rows (:func:`grpo.core.batch.pack`); rows
            ``j * share .. j * share + share - 1`` hold the same prompt.
        completion_start: ``[N]`` prompt lengths ``l >= 1``.
        completion_ids: ``[N, T]``.
        share: rows per block.

    Returns:
        ``[N, T, D]``: row ``i``'s hidden state at position ``l_i - 1 + t``.
    """
    N, T = completion_ids.shape
    P = input_ids.shape[1] - T
    body = trunk(model)
    recorders = [PrefixRecorder() for _ in body.layers]
    # Positions >= l_b of the block's first row are its completion; the causal mask keeps
    # them out of positions < l_b, and SharedPrefixTrainCache.prefix_mask out of the others.
    h_prompt = body(input_ids[::share, :P], cache=recorders)  # [B, P, D]
    starts = completion_start.astype(mx.int32)
    caches = [SharedPrefixTrainCache(r.keys, r.values, starts) for r in recorders]
    h_completion = body(completion_ids, cache=caches)  # [N, T, D]
    last = mx.take_along_axis(h_prompt, (starts[::share] - 1)[:, None, None], axis=1)
    first = mx.repeat(last, share, axis=0)  # [N, 1, D]: predicts completion token 0
    return mx.concatenate([first, h_completion[:, : T - 1]], axis=1)
