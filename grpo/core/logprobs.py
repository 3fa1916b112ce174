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


def _logp_chunk(logits: mx.array, tokens: mx.array, temperature: float) -> mx.array:
    z = _scaled_f32(logits, temperature)
    return _gathered(z, tokens) - mx.logsumexp(z, axis=-1)


def _logp_entropy_chunk(logits: mx.array, tokens: mx.array, temperature: float):
    z = _scaled_f32(logits, temperature)
    lse = mx.logsumexp(z, axis=-1, keepdims=True)
    logp_all = z - lse
    # -sum p log p on the normalised log-probs (TRL's entropy_from_logits), not lse - sum p z,
    # which cancels badly for large logits.
    entropy = -(mx.exp(logp_all) * logp_all).sum(axis=-1)
    return _gathered(z, tokens) - lse[..., 0], entropy


def _map_chunks(fn, logits, tokens, temperature, max_chunk_elements):
    # fn over bounded blocks; returns a list of [..., T] outputs (one per output of fn).
    *lead, T, V = logits.shape
    R = math.prod(lead)
    if R * T * V <= max_chunk_elements:
        out = fn(logits, tokens, temperature)
        return list(out) if isinstance(out, tuple) else [out]
    x, y = logits.reshape(R, T, V), tokens.reshape(R, T)
    rows, prev = {}, None
    for r0, r1, t0, t1 in _blocks(R, T, V, max_chunk_elements):
        xb, yb = x[r0:r1, t0:t1], y[r0:r1, t0:t1]
        if prev is not None:
            # MLX evaluates independent branches breadth-first; this edge serialises the
            # chunks so only a few chunks' float32 temporaries are live at once, not all T.
            xb = mx.depends(xb, prev)
        # Checkpointed: the backward pass recomputes a chunk's temporaries instead of
        # keeping every chunk's float32 copy alive between forward and backward.
        out = mx.checkpoint(lambda xb, yb=yb: fn(xb, yb, temperature))(xb)
        prev = list(out) if isinstance(out, tuple) else [out]
        rows.setdefault((r0, r1), []).append(prev)
    blocks = [
        [mx.concatenate(k, axis=1) for k in zip(*parts, strict=True)] for parts in rows.values()
    ]
    return [mx.concatenate(k, axis=0).reshape(*lead, T) for k in zip(*blocks, strict=True)]


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
