"""The GRPO optimisation step: accumulate and clip (compiled), apply (eager).

.. math::

    g = \\sum_k w_k \\nabla_\\theta \\mathcal{L}_k(\\theta), \\qquad
    \\theta' = \\mathrm{AdamW}(\\theta, \\mathrm{clip}(g, c))

``train_step(state, batch) -> (state, metrics)`` is a pure function of its arguments: the
gradient half is wrapped by ``mx.compile`` (the model, optimizer object, loss function and
config are closed-over constants, never traced arguments), the update runs eagerly so it
can reuse the old state's buffers. ``batch`` is a NamedTuple whose every leaf has a leading
micro-batch axis ``K = gradient_accumulation_steps``; micro-batch ``k`` is weighted by
``w_k``, its share of the loss type's normaliser over the accumulated batch, so the update
equals one big-batch update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from grpo.core import distributed as dist
from grpo.core.state import TrainState, float32_tree
from grpo.core.surrogates import LOSSES

# -- accumulation weights ----------------------------------------------------------------


def per_sequence_weights(masks: mx.array, *, group=None) -> mx.array:
    """``w_k = n_k / sum_j n_j``: every sequence counts once (grpo, dr_grpo, sapo, luspo).

    Args:
        masks: ``[K, n, T]`` loss masks of the ``K`` micro-batches.

    Returns:
        ``[K]`` float32 weights summing to 1.
    """
    K, n = masks.shape[0], masks.shape[1]
    return mx.full((K,), 1.0 / K, dtype=mx.float32) if n else mx.zeros((K,), mx.float32)


def per_token_weights(masks: mx.array, *, group=None) -> mx.array:
    """``w_k = tokens_k / sum_j tokens_j``: every live token counts once (bnpo, dapo, cispo, vespo).

    A micro-batch whose loss is ``sum(l * mask) / tokens_k`` weighted this way adds up to
    ``sum(l * mask) / num_items_in_batch`` over the accumulated batch.

    With a data-parallel ``group`` of ``W`` ranks the denominator is the all-reduced
    token count over ``W`` so that averaging the ranks' gradients gives the global
    per-token mean.

    Args:
        masks: ``[K, n, T]`` loss masks.
        group: ``mx.distributed`` group or ``None`` for one process.

    Returns:
        ``[K]`` float32 weights (all zero when no token is live).
    """
    tokens = masks.astype(mx.float32).sum(axis=(1, 2))
    total = dist.all_mean(tokens.sum(), group=group)
    return tokens / mx.maximum(total, 1.0)


def accumulation_weights_for(loss_type: str) -> Callable[[mx.array], mx.array]:
    """The micro-batch weighting matching ``loss_type``'s normaliser (:data:`LOSSES`)."""
    if loss_type not in LOSSES:
        raise ValueError(
            f"no gradient-accumulation rule for loss_type={loss_type!r}; known: {list(LOSSES)}"
        )
    return per_token_weights if LOSSES[loss_type].per_token else per_sequence_weights


# -- bucketing ---------------------------------------------------------------------------


def bucket_length(n: int, *, multiple: int | None = None, cap: int | None = None) -> int:
    """Padded length for ``n`` so compiled shapes come from a small set.

    Rounds up to a multiple of ``multiple``, or to the next power of two when
    ``multiple`` is None, then clips to ``cap`` (never below ``n``).
    """
    if n < 1:
        n = 1
    if multiple is None:
        padded = 1 << (n - 1).bit_length()
    else:
        padded = -(-n // multiple) * multiple
    if cap is not None:
        padded = min(padded, max(cap, n))
    return padded


# -- the step ----------------------------------------------------------------------------


def _is_leaf(x) -> bool:
    return x is None or isinstance(x, mx.array)


def _after(x, done):
    return None if x is None else mx.depends(x, done)


def _micro(batch: Any, k: int) -> Any:
    # None marks an absent optional field (LossBatch); it stays None in every micro-batch.
    return tree_map(lambda x: None if x is None else x[k], batch, is_leaf=_is_leaf)


def _accumulate(grad_fn, params, batch, weights: mx.array, K: int):
    grads, loss, metrics = None, mx.array(0.0, mx.float32), []
    for k in range(K):
        micro = _micro(batch, k)
        if grads is not None:
            # Micro-batch k starts once k - 1's gradients exist, so one micro-batch's
            # activations are live at a time (MLX would otherwise run them side by side).
            done = [x for _, x in tree_flatten(grads)] + [loss]
            micro = tree_map(lambda x, done=done: _after(x, done), micro, is_leaf=_is_leaf)
        (loss_k, metrics_k), g = grad_fn(params, micro)
        w = weights[k]
        g = tree_map(lambda x, w=w: x * w.astype(x.dtype), g)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss = loss + w * loss_k.astype(mx.float32)
        metrics.append(metrics_k)
    # TRL logs each micro-batch's metrics and averages them; do the same.
    mean = {name: sum(m[name].astype(mx.float32) for m in metrics) / K for name in metrics[0]}
    return grads, loss, mean


def _squared_norm(g: mx.array) -> mx.array:
    # The flattened gradient's dot product with itself: the sum of squares without a
    # gradient-sized temporary. ``g.square().sum()`` (mlx.optimizers.clip_grad_norm)
    # allocates one per leaf, and MLX runs the leaves side by side, so the step's peak
    # held one more copy of the gradients (full fine-tune, V = 151,936: +290 MiB).
    if g.dtype == mx.float16:  # float16 squares overflow; mlx sums them in float32 too
        g = g.astype(mx.float32)
    flat = g.reshape(-1)
    return mx.inner(flat, flat)


def global_norm(grads) -> mx.array:
    """``sqrt(sum_leaves sum(g ** 2))``, the norm ``mlx.optimizers.clip_grad_norm`` clips by."""
    leaves = [g for _, g in tree_flatten(grads)]
    return mx.sqrt(sum((_squared_norm(g) for g in leaves), mx.array(0.0, mx.float32)))


def clip_by_global_norm(grads, max_norm: float):
    """``mlx.optimizers.clip_grad_norm`` with :func:`global_norm`: ``(clipped, norm)``.

    Scales every gradient by ``min(max_norm / (norm + 1e-6), 1)`` and casts back to its
    dtype after scaling, as mlx does; ``max_norm <= 0`` returns ``grads`` unscaled.
    """
    norm = global_norm(grads)
    if not max_norm > 0:
        return grads, norm
    normalizer = mx.minimum(max_norm / (norm + 1e-6), 1.0)

    def scale(g):
        if mx.issubdtype(g.dtype, mx.floating):
            return (g * normalizer).astype(g.dtype)
        return g * normalizer

    return tree_map(scale, grads), norm


def _apply(optimizer, grads, params, opt_state):
    # The only place the optimizer object meets the traced arrays.
    # The update runs in float32 and is cast back: in float16, Adam's eps=1e-8 rounds to 0,
    # so a zero gradient (e.g. uniform rewards) would make m / (sqrt(v) + eps) = 0 / 0.
    optimizer.state = opt_state
    new = optimizer.apply_gradients(float32_tree(grads), float32_tree(params))
    params = tree_map(lambda n, p: n.astype(p.dtype), new, params)
    return params, optimizer.state


def _default_mask(batch: Any) -> mx.array:
    mask = getattr(batch, "completion_mask", None)
    return batch.mask if mask is None else mask


def make_grad_step(
    loss_fn: Callable[[Any, Any], tuple[mx.array, dict]],
    *,
    accumulation: int = 1,
    max_grad_norm: float = 1.0,
    weigh: Callable[..., mx.array] = per_token_weights,
    mask_of: Callable[[Any], mx.array] | None = None,
    group: Any = None,
    compile: bool = True,
    random_state: bool = False,
) -> Callable[[Any, Any], tuple[Any, dict]]:
    """Build ``grad_step(params, batch) -> (grads, metrics)``: accumulate, average, clip.

    The gradient half of :func:`make_train_step` (same arguments); ``grads`` are the
    clipped gradients, ``metrics`` hold ``loss``, ``grad_norm`` (before clipping) and
    ``loss_fn``'s metrics averaged over micro-batches. ``random_state`` lists mlx's global
    RNG as compiled state, so a ``loss_fn`` with dropout draws fresh masks every call.
    """
    K, max_norm = int(accumulation), float(max_grad_norm)
    mask_of = mask_of or _default_mask
    grad_fn = mx.value_and_grad(loss_fn)

    def grad_step(params: Any, batch: Any) -> tuple[Any, dict]:
        masks = mask_of(batch)
        if masks.ndim != 3 or masks.shape[0] != K:
            raise ValueError(
                f"train_step: batch leaves need a leading micro-batch axis of size "
                f"accumulation={K} (gradient_accumulation_steps={K}); mask shape is "
                f"{tuple(masks.shape)}"
            )
        weights = weigh(masks, group=group)
        grads, loss, metrics = _accumulate(grad_fn, params, batch, weights, K)
        grads = dist.average_gradients(grads, group=group)
        grads, grad_norm = clip_by_global_norm(grads, max_norm)
        return grads, {**metrics, "loss": loss, "grad_norm": grad_norm.astype(mx.float32)}

    if not compile:
        return grad_step
    if random_state:
        return mx.compile(grad_step, inputs=[mx.random.state], outputs=[mx.random.state])
    return mx.compile(grad_step)


def apply_update(optimizer: optim.Optimizer, state: TrainState, grads: Any) -> TrainState:
    """One optimizer update: ``state`` with new params and optimizer state, the key split
    and the step counted. ``state`` itself is not modified.

    Runs eagerly, not under ``mx.compile``: MLX can then write new values into buffers
    that nothing else references any more (``state = apply_update(opt, state, grads);
    del grads; mx.eval(state)``), where a compiled update allocates all-new buffers for
    the parameters and both Adam moments. Measured with bench/memory.py (full fine-tune,
    V = 151,936, T = 64): step peak 3028 -> 2726 MiB; the update alone on that model's
    387 MiB of parameters took 2.1 s eager vs 7.9 s compiled on the CPU backend.
    """
    # A fresh container tree: the optimizer writes its new state into the dicts it holds,
    # and those must not be the caller's.
    opt_state = tree_map(lambda x: x, state.opt_state)
    params, opt_state = _apply(optimizer, grads, state.params, opt_state)
    key, _ = mx.random.split(state.key)
    return TrainState(params, opt_state, key, state.step + 1)


def make_train_step(
    loss_fn: Callable[[Any, Any], tuple[mx.array, dict]],
    optimizer: optim.Optimizer,
    *,
    accumulation: int = 1,
    max_grad_norm: float = 1.0,
    weigh: Callable[..., mx.array] = per_token_weights,
    mask_of: Callable[[Any], mx.array] | None = None,
    group: Any = None,
    rebind: Any = None,
    compile: bool = True,
    random_state: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    The gradients come from a compiled function (:func:`make_grad_step`), the update
    from :func:`apply_update`. Everything stays lazy until the caller evaluates: evaluate
    ``metrics`` alone to check the loss and gradient norm before any update is computed,
    and rebind the state before evaluating it (``state, metrics = train_step(state,
    batch); mx.eval(state, metrics)``) so the update reuses the old state's buffers.

    Args:
        loss_fn: ``loss_fn(params, micro_batch) -> (loss [] , metrics {name: []})``.
        optimizer: an ``mlx.optimizers.Optimizer`` (closed over; its state comes from
            ``state.opt_state`` on every call), e.g. :func:`grpo.make_optimizer`.
        accumulation: ``K``, micro-batches per optimizer step (the batch's leading axis).
        max_grad_norm: clip the global gradient norm to this (0: no clipping).
        weigh: ``weigh(masks [K, n, T], group=) -> [K]`` micro-batch weights matching the
            loss's normaliser: :func:`per_token_weights` or :func:`per_sequence_weights`
            (:func:`accumulation_weights_for` picks one by loss type).
        mask_of: micro-batch stack -> ``[K, n, T]`` loss mask (default:
            ``batch.completion_mask``, else ``batch.mask``).
        group: ``mx.distributed`` group for data parallelism (``None``: one process);
            token normalisers are all-reduced and gradients averaged with
            ``mlx.nn.average_gradients`` before clipping.
        rebind: the ``mlx.nn.Module`` ``loss_fn`` updates in place, if any: after each step
            it holds the new parameters (a compiled ``loss_fn`` would otherwise leave it
            holding placeholders of the trace).
        compile: compile the gradient computation (False for path-equivalence tests).
        random_state: compile with mlx's global RNG as state (dropout in ``loss_fn``).

    Returns:
        The step. ``metrics`` holds ``loss``, ``grad_norm`` (before clipping),
        ``learning_rate`` and ``loss_fn``'s metrics averaged over micro-batches.
    """
    grad_step = make_grad_step(
        loss_fn, accumulation=accumulation, max_grad_norm=max_grad_norm, weigh=weigh,
        mask_of=mask_of, group=group, compile=compile, random_state=random_state,
    )  # fmt: skip

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        grads, metrics = grad_step(state.params, batch)
        new = apply_update(optimizer, state, grads)
        if rebind is not None:
            rebind.update(new.params)
        lr = new.opt_state["learning_rate"].astype(mx.float32)
        return new, {**metrics, "learning_rate": lr}

    return train_step
