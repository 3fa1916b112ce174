"""The model forward of the loss: per-token log-probs of completions under a model.

.. math:: \\log\\pi_\\theta(c_{i,t} \\mid x_{i, < s_i + t})

:func:`completion_logprobs` is the one place where a model object meets its parameter
arrays: it runs the trunk (each shared prompt once when it can,
:mod:`grpo.core.shared_prefix`), gathers the hidden states that predict completion
tokens and applies the model's own LM head to them a chunk at a time
(:func:`grpo.core.logprobs.head_logprobs`). :func:`lora_reference_params` turns a LoRA
adapter tree into the frozen base model's reference policy.
"""

from __future__ import annotations

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
from grpo.core.shared_prefix import can_share_prefix, shared_prefix_hidden


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
            with ``k > 1`` each prompt runs once (:mod:`grpo.core.shared_prefix`) when the
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
    if can_share_prefix(model, N, prompt_share):
        return shared_prefix_hidden(
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
