"""Per-token log-probabilities and entropies from logits, without a full float32 log-softmax.

.. math::

    \\log \\pi(y_t) = z_{t, y_t} / \\tau - \\operatorname{logsumexp}_v(z_{t, v} / \\tau),
    \\qquad H_t = -\\sum_v p_{t, v} \\log p_{t, v}

Both reduce in float32. When ``rows * T * V`` exceeds ``max_chunk_elements`` the work is
split along ``T`` so the float32 temporaries stay bounded by one chunk, not ``[..., T, V]``.
The functions are differentiable and trace under ``mx.compile`` (the chunking is decided by
static shapes only).
"""

from __future__ import annotations

import math

import mlx.core as mx

from grpo.core import fastmath

# 2**22 float32 elements = 16 MiB of temporaries per chunk.
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 22


def _check(logits: mx.array, tokens: mx.array, temperature: float, max_chunk_elements: int):
    if logits.ndim < 2 or tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"token_logprobs: logits must be [..., T, V] and tokens [..., T]; got "
            f"logits.shape={tuple(logits.shape)}, tokens.shape={tuple(tokens.shape)}"
        )
    if not temperature > 0:
        raise ValueError(
            f"token_logprobs: temperature must be > 0, got temperature={temperature!r}"
        )
    if max_chunk_elements < 1:
        raise ValueError(
            f"token_logprobs: max_chunk_elements must be >= 1, got {max_chunk_elements!r}"
        )


def _blocks(R: int, T: int, V: int, max_chunk_elements: int):
    # Static (r0, r1, t0, t1) blocks of a [R, T, V] array, each <= max_chunk_elements.
    if T * V <= max_chunk_elements:
        step = max_chunk_elements // (T * V)
        return [(r, min(r + step, R), 0, T) for r in range(0, R, step)]
    # One row at a time: x[r, t0:t1] stays a contiguous view even when the caller's logits
    # are a T-slice of a bigger array, so no hidden copies beyond one chunk.
    step = max(1, max_chunk_elements // V)
    return [(r, r + 1, t, min(t + step, T)) for r in range(R) for t in range(0, T, step)]


def _scaled_f32(logits: mx.array, temperature: float) -> mx.array:
    z = logits.astype(mx.float32)
    # Python-level check on a static float: skips a [.., V] multiply at the default.
    return z if temperature == 1.0 else z / temperature


def _gathered(z: mx.array, tokens: mx.array) -> mx.array:
    return mx.take_along_axis(z, tokens[..., None].astype(mx.int32), axis=-1)[..., 0]


def _logp_lse(logits: mx.array, tokens: mx.array, temperature: float, with_entropy: bool):
    # [log p(y), log-sum-exp] (+ [entropy]) over the last axis, in float32.
    z = _scaled_f32(logits, temperature)
    lse = fastmath.logsumexp(z, axis=-1, keepdims=True)
    out = [_gathered(z, tokens) - lse[..., 0], lse[..., 0]]
    if with_entropy:
        logp_all = z - lse
        # -sum p log p on the normalised log-probs (TRL's entropy_from_logits), not
        # lse - sum p z, which cancels badly for large logits.
        out.append(-(fastmath.exp(logp_all) * logp_all).sum(axis=-1))
    return out


def _logp_chunk(logits: mx.array, tokens: mx.array, temperature: float) -> mx.array:
    return _logp_lse(logits, tokens, temperature, False)[0]


def _logp_entropy_chunk(logits: mx.array, tokens: mx.array, temperature: float):
    logp, _, entropy = _logp_lse(logits, tokens, temperature, True)
    return logp, entropy


def _dlogits(z, lse, hit, cotangents, entropy, temperature):
    # d logp_t / dz = (onehot(y_t) - p_t) / tau ;  d H_t / dz = -p_t (log p_t + H_t) / tau,
    # with p rebuilt from the log-sum-exp in one exp pass. ``hit`` is the one-hot of y over
    # z's columns; ``cotangents`` (and ``entropy``) broadcast against z.
    logp_all = z - lse
    p = fastmath.exp(logp_all)
    g = (hit.astype(mx.float32) - p) * cotangents[0]
    if len(cotangents) > 1:
        g = g - p * (logp_all + entropy) * cotangents[1]
    return g if temperature == 1.0 else g / temperature


def _grad_chunk(logits, tokens, cotangents, outputs, temperature):
    # The forward's outputs give lse = z_y - logp_y (no second logsumexp); H comes from
    # the forward's entropy output.
    z = _scaled_f32(logits, temperature)
    lse = (_gathered(z, tokens) - outputs[0])[..., None]
    hit = mx.arange(z.shape[-1])[None, None, :] == tokens[..., None].astype(mx.int32)
    cots = [c[..., None] for c in cotangents]
    entropy = outputs[1][..., None] if len(cotangents) > 1 else None
    return _dlogits(z, lse, hit, cots, entropy, temperature).astype(logits.dtype)


def _serial_map(fn, x, y, blocks):
    # fn over bounded blocks of x [R, T, V] / y [R, T], reassembled into [R, T] outputs.
    # MLX evaluates independent branches breadth-first; the depends edge serialises the
    # chunks so only a few chunks' float32 temporaries are live at once, not all of them.
    rows, prev = {}, None
    for r0, r1, t0, t1 in blocks:
        xb = x[r0:r1, t0:t1]
        if prev is not None:
            xb = mx.depends(xb, prev)
        out = fn(xb, y[r0:r1, t0:t1])
        prev = list(out) if isinstance(out, (tuple, list)) else [out]
        rows.setdefault((r0, r1), []).append(prev)
    blocks_out = [
        [mx.concatenate(k, axis=1) for k in zip(*parts, strict=True)] for parts in rows.values()
    ]
    return [mx.concatenate(k, axis=0) for k in zip(*blocks_out, strict=True)]


def _map_chunks(fn, logits, tokens, temperature, max_chunk_elements):
    # fn over bounded blocks; returns a list of [..., T] outputs (one per output of fn).
    *lead, T, V = logits.shape
    R = math.prod(lead)
    if R * T * V <= max_chunk_elements:
        out = fn(logits, tokens, temperature)
        return list(out) if isinstance(out, tuple) else [out]
    blocks = _blocks(R, T, V, max_chunk_elements)

    # A hand-written chunked backward: autodiff through the slices would give every chunk
    # its own zero-filled [R, T, V] cotangent (slice's vjp) and sum them, so the backward
    # would hold several full-size arrays. Here the gradient is one [R, T, V] array in the
    # logits' dtype, built chunk by chunk from float32 temporaries of one chunk.
    @mx.custom_function
    def chunked(x, y):
        return tuple(_serial_map(lambda xb, yb: fn(xb, yb, temperature), x, y, blocks))

    @chunked.vjp
    def chunked_vjp(primals, cotangents, outputs):
        x, y = primals
        cots = list(cotangents) if isinstance(cotangents, (tuple, list)) else [cotangents]
        outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        parts, prev = [], None
        for r0, r1, t0, t1 in blocks:
            xb = x[r0:r1, t0:t1]
            if prev is not None:
                xb = mx.depends(xb, prev)
            cb = [c[r0:r1, t0:t1] for c in cots]
            ob = [o[r0:r1, t0:t1] for o in outs]
            prev = _grad_chunk(xb, y[r0:r1, t0:t1], cb, ob, temperature)
            parts.append(prev.reshape(-1, V))
        # Blocks are row-major, so one concatenation of the flattened parts is [R * T, V]:
        # a single full-size copy (nested row/column concatenations would make two).
        return mx.concatenate(parts, axis=0).reshape(R, T, V), mx.zeros_like(y)

    outs = chunked(logits.reshape(R, T, V), tokens.reshape(R, T))
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return [o.reshape(*lead, T) for o in outs]


def token_logprobs(
    logits: mx.array,
    tokens: mx.array,
    *,
    temperature: float = 1.0,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> mx.array:
    """Log-probability of each given token under ``softmax(logits / temperature)``.

    .. math:: \\log \\pi(y_t) = z_{t, y_t}/\\tau - \\operatorname{logsumexp}_v(z_{t,v}/\\tau)

    Args:
        logits: ``[..., T, V]`` any float dtype.
        tokens: ``[..., T]`` integer token ids in ``[0, V)``.
        temperature: ``tau > 0``; TRL divides the logits by it before the log-softmax.
        max_chunk_elements: chunk along ``T`` when ``prod(...) * T * V`` exceeds this.

    Returns:
        ``[..., T]`` float32 log-probabilities.
    """
    _check(logits, tokens, temperature, max_chunk_elements)
    return _map_chunks(_logp_chunk, logits, tokens, temperature, max_chunk_elements)[0]


def token_logprobs_and_entropy(
    logits: mx.array,
    tokens: mx.array,
    *,
    temperature: float = 1.0,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> tuple[mx.array, mx.array]:
    """Per-token log-probabilities and entropies of ``softmax(logits / temperature)``.

    .. math:: H_t = -\\sum_v p_{t,v} \\log p_{t,v}, \\quad p_t = \\operatorname{softmax}(z_t / \\tau)

    The entropy is TRL's ``entropy_from_logits`` applied to the temperature-scaled logits,
    and stays differentiable (for an entropy bonus).

    Args:
        logits: ``[..., T, V]`` any float dtype.
        tokens: ``[..., T]`` integer token ids in ``[0, V)``.
        temperature: ``tau > 0``.
        max_chunk_elements: chunk along ``T`` when ``prod(...) * T * V`` exceeds this.

    Returns:
        ``(logprobs [..., T], entropy [..., T])``, both float32.
    """
    _check(logits, tokens, temperature, max_chunk_elements)
    logp, entropy = _map_chunks(
        _logp_entropy_chunk, logits, tokens, temperature, max_chunk_elements
    )
    return logp, entropy


# --------------------------------------------------------------- chunked LM head

# Logits elements per head chunk. A chunk costs about 13 (eager) to 20 (compiled) float32
# arrays of its size at the peak (the log-softmax and its backward), so 2**22 is ~330 MB.
DEFAULT_HEAD_CHUNK_ELEMENTS = 1 << 22


def head_chunk_rows(V: int, max_chunk_elements: int = DEFAULT_HEAD_CHUNK_ELEMENTS) -> int:
    """Positions per chunk of :func:`head_logprobs` so one chunk's logits hold at most
    ``max_chunk_elements`` elements (at least one position)."""
    return max(1, max_chunk_elements // max(V, 1))


def _head_blocks(R: int, rows: int) -> list[tuple[int, int]]:
    return [(r, min(r + rows, R)) for r in range(0, R, rows)]


def _row_chunks(fn, h: mx.array, y: mx.array, blocks) -> tuple:
    # fn(h[r0:r1], y[r0:r1]) -> list of [r1 - r0] outputs, block after block (each waits
    # for the previous one's outputs, so one block's logits are alive at a time), joined.
    outs, prev = [], None
    for r0, r1 in blocks:
        hb = h[r0:r1] if prev is None else mx.depends(h[r0:r1], prev)
        prev = fn(hb, y[r0:r1])
        outs.append(prev)
    return tuple(mx.concatenate(k, axis=0) for k in zip(*outs, strict=True))


def head_logprobs(
    head_fn,
    hidden: mx.array,
    tokens: mx.array,
    params: list[mx.array],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_rows: int,
    linear: bool = False,
):
    """Log-probs (and entropies) of ``tokens`` under ``head_fn``'s logits, a chunk at a time.

    .. math:: \\log \\pi(y_t) = z_{t, y_t}/\\tau - \\operatorname{logsumexp}_v(z_{t,v}/\\tau),
              \\quad z_t = \\text{head}(h_t)

    The ``N * T`` positions go through the head ``chunk_rows`` at a time, and the backward
    recomputes each chunk's logits instead of keeping them: neither pass holds anything of
    size ``[N, T, V]``, only ``[chunk_rows, V]`` temporaries and one gradient per weight
    (with ``linear``, the backward's blocks are ``[N * T, Vb]`` of at most as many
    elements, but never narrower than :data:`MIN_VOCAB_BLOCK` columns).

    Args:
        head_fn: ``head_fn(params, h [1, c, D]) -> logits [1, c, V]``, a pure function of
            its arguments (the head's weights come in as ``params``).
        hidden: ``[N, T, D]`` last hidden states that predict ``tokens``.
        tokens: ``[N, T]`` integer ids.
        params: the head's differentiable weights (may be empty, e.g. a frozen head).
        temperature: ``tau > 0``.
        with_entropy: also return per-token entropies (differentiable).
        chunk_rows: positions per chunk (:func:`head_chunk_rows`).
        linear: ``head_fn(params, h)`` is ``h @ params[0].T`` (checked by the caller, e.g.
            :func:`grpo.core.lm.check_linear_head`): the backward then runs over blocks of
            the vocabulary instead of blocks of positions
            (:func:`_linear_head_logprobs`), so it never accumulates a ``[V, D]`` weight
            gradient chunk by chunk.

    Returns:
        ``logprobs [N, T]`` float32, or ``(logprobs, entropies)`` with ``with_entropy``.
    """
    N, T, D = hidden.shape
    if tuple(tokens.shape) != (N, T):
        raise ValueError(
            f"head_logprobs: hidden must be [N, T, D] and tokens [N, T]; got hidden.shape="
            f"{tuple(hidden.shape)}, tokens.shape={tuple(tokens.shape)}"
        )
    if chunk_rows < 1:
        raise ValueError(f"head_logprobs: chunk_rows must be >= 1, got {chunk_rows!r}")
    if linear:
        outs = _linear_head_logprobs(
            hidden.reshape(N * T, D), tokens.reshape(N * T).astype(mx.int32), params[0],
            temperature=temperature, with_entropy=with_entropy, chunk_rows=chunk_rows,
        )  # fmt: skip
        outs = [o.reshape(N, T) for o in outs]
        return tuple(outs) if with_entropy else outs[0]
    blocks = _head_blocks(N * T, chunk_rows)
    chunk = _logp_entropy_chunk if with_entropy else _logp_chunk

    def logits_of(hb, ps):
        return head_fn(list(ps), hb[None])[0]

    @mx.custom_function
    def f(h, y, *ps):
        def one(hb, yb):
            out = chunk(logits_of(hb, ps), yb, temperature)
            return list(out) if isinstance(out, tuple) else [out]

        return _row_chunks(one, h, y, blocks)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, y, *ps = primals
        cots = list(cotangents) if isinstance(cotangents, (tuple, list)) else [cotangents]
        outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        dh, dps, prev = [], None, None
        for r0, r1 in blocks:
            # Each chunk waits for the previous one's gradients, so only one chunk's
            # recomputed logits and their float32 temporaries are alive at a time.
            hb = h[r0:r1] if prev is None else mx.depends(h[r0:r1], prev)
            yb = y[r0:r1][None]
            logits = logits_of(hb, ps)[None]
            cb = [c[r0:r1][None] for c in cots]
            ob = [o[r0:r1][None] for o in outs]
            g = _grad_chunk(logits, yb, cb, ob, temperature)[0]
            _, grads = mx.vjp(lambda x, *w: logits_of(x, w), [hb, *ps], [g])
            dh.append(grads[0])
            dps = grads[1:] if dps is None else [a + b for a, b in zip(dps, grads[1:], strict=True)]
            prev = [grads[0], *dps]
        return (mx.concatenate(dh, axis=0), mx.zeros_like(y), *dps)

    outs = f(hidden.reshape(N * T, D), tokens.reshape(N * T).astype(mx.int32), *params)
    outs = [o.reshape(N, T) for o in outs]
    return tuple(outs) if with_entropy else outs[0]


# ------------------------------------------------------------ the linear head's path

# Vocabulary columns per backward block, at least (the block shape is [positions, Vb]).
MIN_VOCAB_BLOCK = 128


def _vocab_blocks(R: int, V: int, max_elements: int) -> list[tuple[int, int]]:
    cols = min(V, max(MIN_VOCAB_BLOCK, max_elements // max(R, 1)))
    return [(v, min(v + cols, V)) for v in range(0, V, cols)]


def _linear_head_logprobs(h, y, W, *, temperature, with_entropy, chunk_rows):
    r""":func:`head_logprobs` for ``logits = h @ W.T``: ``h [R, D]``, ``y [R]``, ``W [V, D]``.

    The forward runs ``chunk_rows`` positions at a time, like the generic path, and also
    returns each position's log-sum-exp. The backward runs a block of vocabulary rows at a
    time over all ``R`` positions (``[R, Vb]`` logits, ``R * Vb <= chunk_rows * V``):

    .. math:: g_{r,v} = \frac{c_r(\mathbb 1[v = y_r] - p_{r,v})
              - e_r\, p_{r,v}(\log p_{r,v} + H_r)}{\tau}, \quad
              \frac{\partial L}{\partial W_{b}} = g_{:, b}^\top h, \quad
              \frac{\partial L}{\partial h} = \sum_b g_{:, b} W_b

    with ``p`` rebuilt from the saved log-sum-exp (no second reduction), ``c`` and ``e``
    the cotangents of the log-probs and entropies. Each block of the weight gradient is
    written once, and the running sum is over ``[R, D]``: a row-blocked backward instead
    adds a ``[V, D]`` partial gradient per chunk, a full read and write of the weight's
    size each time (and two such buffers alive, since MLX does not reuse the running sum's
    buffer under a dependency edge).
    """
    R, D = h.shape
    V = W.shape[0]
    rows = _head_blocks(R, chunk_rows)
    cols = _vocab_blocks(R, V, chunk_rows * V)
    tau = float(temperature)

    @mx.custom_function
    def f(h, y, W):
        return _row_chunks(lambda hb, yb: _logp_lse(hb @ W.T, yb, tau, with_entropy), h, y, rows)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, y, W = primals
        lse = outputs[1][:, None]
        # Cotangents of (log p, log-sum-exp, entropy): the log-sum-exp output is internal.
        picked = [cotangents[0], cotangents[2]] if with_entropy else [cotangents[0]]
        cots = [c.astype(mx.float32)[:, None] for c in picked]
        entropy = outputs[2][:, None] if with_entropy else None
        dh, dW, prev = None, [], None
        for v0, v1 in cols:
            # Each block waits for the previous one's gradients, so only one block's
            # logits and their float32 temporaries are alive at a time.
            hb = h if prev is None else mx.depends(h, prev)
            Wb = W[v0:v1]
            hit = mx.arange(v0, v1)[None, :] == y[:, None]
            z = _scaled_f32(hb @ Wb.T, tau)
            g = _dlogits(z, lse, hit, cots, entropy, tau).astype(W.dtype)
            dh = g @ Wb if dh is None else mx.addmm(dh, g, Wb)
            dW.append(g.T @ hb)
            prev = [dh, dW[-1]]
        dW = mx.concatenate(dW, axis=0)
        # The blocks become one array before anything downstream of ``dh`` runs; left to
        # the scheduler, the concatenation can wait until the end of the backward, with
        # the blocks (one weight's size) alive through all of it.
        return mx.depends(dh.astype(h.dtype), [dW]), mx.zeros_like(y), dW

    logp, _, *entropy = f(h, y, W)
    return [logp, *entropy]
