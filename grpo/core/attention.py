"""Attention kernels for mlx-lm models on the CPU, as pure functions of arrays.

MLX's CPU ``scaled_dot_product_attention`` has no fused kernel: it forms every score,
masks, and runs a softmax whose ``exp`` is the slowest op of the CPU backend (scalar,
single-threaded); the MLP's SiLU is the same ``exp`` again. These kernels, exact up to
float32 rounding, route around that (docs/benchmarks.md has the before/after figures):

- :func:`attention` is the same ``softmax(q k^T * scale + mask) v`` as MLX's CPU fallback,
  with the softmax from :mod:`grpo.core.fastmath` and the grouped-query heads folded into
  the rows of one matmul per KV head (no broadcast copies of the keys).
- :func:`block_causal_attention` splits a cache-free causal forward (loss, reference and
  old log-probs) into blocks of query rows that each see only the keys up to their own
  last row, so the masked upper triangle is never computed: with ``n = ceil(L / block)``
  blocks the scores computed drop to about ``(n + 1) / (2n)`` of ``L^2``.
- :func:`prefix_attention` reads a group's shared prompt keys once for all its rows
  (:mod:`grpo.core.kv_cache`).

:func:`make_attention` and :func:`make_swiglu` build the per-call dispatch that
:func:`grpo.io.fast_attention.install_fast_kernels` puts in an mlx-lm module; calls with
attention sinks or a quantized KV cache, and every call on Metal/CUDA, keep mlx-lm's own
functions.
"""

from __future__ import annotations

import mlx.core as mx

from grpo.core import fastmath

DEFAULT_BLOCK = 64


def _causal(L: int, S: int) -> mx.array:
    # Query row i (of the last L positions) sees keys up to S - L + i, as MLX's "causal".
    return mx.arange(S)[None, :] <= (mx.arange(L) + (S - L))[:, None]


def _fold_mask(mask: mx.array, Hkv: int, rep: int, L: int, S: int) -> mx.array:
    # A mask broadcastable to [B, Hq, L, S] -> [B, 1 or Hkv, rep * L, S], rows ordered (rep, L).
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    Bm, Hm = m.shape[0], m.shape[1]
    if Hm == 1:
        m = mx.broadcast_to(m[:, :, None], (Bm, 1, rep, L, S))
        return m.reshape(Bm, 1, rep * L, S)
    m = mx.broadcast_to(m, (Bm, Hm, L, S))
    return m.reshape(Bm, Hkv, rep * L, S)


def attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask=None
) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` as MLX's CPU fallback computes it, with a fast softmax.

    Args:
        queries: ``[B, Hq, L, D]``.
        keys: ``[B, Hkv, S, D]`` (``Hq`` a multiple of ``Hkv``, ``S >= L``).
        values: ``[B, Hkv, S, Dv]``.
        scale: score scale.
        mask: ``None``, ``"causal"``, or an array broadcastable to ``[B, Hq, L, S]``: bool
            (False = masked, a fully masked row attends uniformly, as in MLX) or additive.

    Returns:
        ``[B, Hq, L, Dv]``.
    """
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    rep = Hq // Hkv
    # Heads sharing a KV head become extra query rows: one [rep*L, S] matmul per KV head.
    q = (queries * scale).reshape(B, Hkv, rep * L, D)
    scores = q @ keys.swapaxes(-1, -2)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"attention: unknown mask {mask!r} (expected 'causal')")
        mask = _causal(L, S)
    if mask is not None:
        m = _fold_mask(mask, Hkv, rep, L, S)
        if m.dtype == mx.bool_:
            scores = mx.where(m, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + m.astype(scores.dtype)
    return _normalised(scores, values).reshape(B, Hq, L, -1)


def _normalised(scores: mx.array, values: mx.array) -> mx.array:
    # softmax(scores) @ values with the division moved after the matmul (as flash attention
    # does): one pass over [.., Dv] instead of one over every score.
    e, total = fastmath.softmax_parts(scores)
    out = e.astype(values.dtype) @ values
    return out / total.astype(out.dtype)


def prefix_attention(
    queries: mx.array, keys: mx.array, values: mx.array, cache, *, scale: float, block=None
):
    """Attention over a prompt prefix shared by each block of ``k`` consecutive rows.

    ``cache`` holds ``prefix_keys`` / ``prefix_values`` ``[B, Hkv, P, D]``, each prompt once
    (:class:`grpo.core.rollout.SharedPrefixKVCache` when decoding,
    :class:`grpo.core.shared_prefix.SharedPrefixTrainCache` in the training forward); ``keys`` /
    ``values`` ``[N, Hkv, S, D]`` (``N = B * k``) are each row's own columns. The scores
    against the prefix are one matmul per prompt and KV head with the block's ``k * rep * L``
    query rows, instead of ``k`` copies of the prompt; both parts share one softmax, so the
    result is :func:`attention` over the concatenated columns. With ``block`` and
    ``L > block`` (the training forward, ``S == L``), query rows go ``block`` at a time
    against the own columns up to their last row, as in :func:`block_causal_attention`.

    Args:
        queries: ``[N, Hq, L, D]``.
        keys: ``[N, Hkv, S, D]`` the rows' own keys.
        values: ``[N, Hkv, S, Dv]``.
        cache: the layer's cache (``prefix_keys``, ``prefix_values``, ``prefix_mask()``
            ``[B, 1, 1, P]``, ``suffix_mask(L)`` broadcastable to ``[L, S]``).
        scale: score scale.
        block: query rows per block, or ``None`` for all at once.

    Returns:
        ``[N, Hq, L, Dv]``.
    """
    L, S = queries.shape[2], keys.shape[2]
    prefix = (cache.prefix_keys, cache.prefix_values, cache.prefix_mask())
    own = mx.broadcast_to(cache.suffix_mask(L), (L, S))
    if not block or L <= block or S != L:
        return _prefix_attention(queries, keys, values, *prefix, own, scale=scale)
    outs = []
    for start in range(0, L, block):
        stop = min(start + block, L)
        q, k, v = queries[:, :, start:stop], keys[:, :, :stop], values[:, :, :stop]
        outs.append(_prefix_attention(q, k, v, *prefix, own[start:stop, :stop], scale=scale))
    return mx.concatenate(outs, axis=2)


def _prefix_attention(
    queries, keys, values, prefix_keys, prefix_values, prefix_mask, own_mask, *, scale
):
    # queries [N, Hq, L, D], keys/values [N, Hkv, S, D], prefix_* [B, Hkv, P, D],
    # prefix_mask [B, 1, 1, P], own_mask [L, S].
    N, Hq, L, D = queries.shape
    B, Hkv, P, _ = prefix_keys.shape
    k, rep = N // B, Hq // Hkv
    R = rep * L  # query rows per (row, KV head), ordered (rep, L)
    low = mx.finfo(queries.dtype).min

    def by_prompt(x):  # [N, Hkv, R, X] -> [B, Hkv, k * R, X]
        return x.reshape(B, k, Hkv, R, -1).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, k * R, -1)

    def by_row(x):  # [B, Hkv, k * R, X] -> [N, Hkv, R, X]
        return x.reshape(B, Hkv, k, R, -1).transpose(0, 2, 1, 3, 4).reshape(N, Hkv, R, -1)

    q = (queries * scale).reshape(N, Hkv, R, D)
    sp = by_row(mx.where(prefix_mask, by_prompt(q) @ prefix_keys.swapaxes(-1, -2), low))
    ss = mx.where(mx.tile(own_mask, (rep, 1)), q @ keys.swapaxes(-1, -2), low)
    e, total = fastmath.softmax_parts(mx.concatenate([sp, ss], axis=-1))
    e = e.astype(values.dtype)
    out = by_row(by_prompt(e[..., :P]) @ prefix_values) + e[..., P:] @ values
    return (out / total.astype(out.dtype)).reshape(N, Hq, L, -1)


def block_causal_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, block: int
) -> mx.array:
    """Causal ``softmax(q k^T * scale) v`` computed one block of query rows at a time.

    Args:
        queries: ``[B, Hq, L, D]``.
        keys: ``[B, Hkv, L, D]`` (``Hq`` a multiple of ``Hkv``).
        values: ``[B, Hkv, L, Dv]``.
        scale: score scale.
        block: query rows per block (``>= 1``).

    Returns:
        ``[B, Hq, L, Dv]``, equal to ``mx.fast.scaled_dot_product_attention(..., mask="causal")``.
    """
    L = queries.shape[2]
    if block < 1:
        raise ValueError(f"block_causal_attention: block must be >= 1, got block={block!r}")
    if keys.shape[2] != L:
        raise ValueError(
            f"block_causal_attention: needs as many keys as queries; got queries "
            f"{tuple(queries.shape)}, keys {tuple(keys.shape)}"
        )
    outs = []
    for start in range(0, L, block):
        stop = min(start + block, L)
        # "causal" aligns the q rows with the last keys: rows start..stop-1 see keys < row+1.
        outs.append(
            attention(
                queries[:, :, start:stop],
                keys[:, :, :stop],
                values[:, :, :stop],
                scale=scale,
                mask="causal",
            )
        )
    return mx.concatenate(outs, axis=2)


def make_attention(original, block: int | None):
    """``scaled_dot_product_attention`` for an mlx-lm module: per call, the shared-prefix,
    block-causal or GQA-folded kernel on the CPU, else ``original`` (mlx-lm's)."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        # Prefix caches come only from rollout / shared_prefix, after shares_prefix() said yes.
        if hasattr(cache, "prefix_keys"):
            if mask is not None and not isinstance(mask, str):
                # The prefix attention builds its own masks; an array here carries scores
                # (e.g. latent attention's RoPE part) it would silently drop.
                raise ValueError(
                    "prefix_attention: the model passes an array mask, which a shared "
                    "prefix cache cannot carry"
                )
            return prefix_attention(queries, keys, values, cache, scale=scale, block=block)
        if sinks is not None or hasattr(cache, "bits") or not fastmath.on_cpu():
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        L = queries.shape[2]
        if (
            (cache is None or getattr(cache, "grpo_cache_free", False))
            and isinstance(mask, str)
            and mask == "causal"
            and block
            and keys.shape[2] == L > block
        ):
            return block_causal_attention(queries, keys, values, scale=scale, block=block)
        return attention(queries, keys, values, scale=scale, mask=mask)

    scaled_dot_product_attention.grpo_original = original
    scaled_dot_product_attention.grpo_block = block
    scaled_dot_product_attention.grpo_prefix_caches = True  # grpo.core.rollout.shares_prefix
    return scaled_dot_product_attention


def make_swiglu(original):
    """``swiglu`` with :func:`grpo.core.fastmath.swiglu` on the CPU, else ``original``."""

    def swiglu(gate, x):
        return fastmath.swiglu(gate, x) if fastmath.on_cpu() else original(gate, x)

    swiglu.grpo_original = original
    return swiglu
