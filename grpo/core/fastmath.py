"""Float32 ``exp``, ``sigmoid``, ``softmax`` and ``logsumexp`` that are fast on MLX's CPU backend.

MLX's CPU ``exp``/``sigmoid``/``softmax`` kernels are scalar and single-threaded (~75 M
elements/s here, docs/benchmarks.md), and they dominate the attention softmax, the SiLU
of the MLP and the log-softmax over the vocabulary. The same ``exp`` written as a chain of
elementwise ops (Cody-Waite range reduction and the Cephes ``expf`` polynomial),

.. math:: e^x = 2^n e^r, \\quad n = \\operatorname{round}(x / \\ln 2),
    \\quad r = x - n \\ln 2 \\in [-\\tfrac{\\ln 2}{2}, \\tfrac{\\ln 2}{2}],

is compiled by ``mx.compile`` into a few fused CPU kernels (MLX does not fuse the bit
cast that builds ``2^n``, so it splits there). On arrays that fit in cache that is 2.5x
faster than ``mx.exp`` (8 x 65536 elements); on arrays several times the L2 size the
extra memory passes eat the gain (about even at 4.7M elements). Float32 accuracy: relative error < 2e-7 (tests/test_fastmath.py). Every function takes the polynomial only
on the CPU device and otherwise calls MLX's own op, so Metal and CUDA runs are unchanged.
Gradients are hand-written (``mx.custom_function``) and reuse the forward's output.
"""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = HI + LO, HI exact in 9 bits
# Cephes expf: e^r ~ 1 + r + r^2 (P0 r^5 + ... + P5) on |r| <= ln(2)/2.
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 0.5)
_X_MIN = -87.33654  # exp(_X_MIN) = FLT_MIN; below it the result is flushed to 0
_X_MAX = 88.37626  # ln(2) * 127.5; above it 2^n leaves float32, so the result is inf


POLYNOMIAL = True  # False: MLX's own ops everywhere (the before arm of bench/ab.py kernels)


def on_cpu() -> bool:
    """True when new arrays go to MLX's CPU backend (where the polynomial path pays off)."""
    return POLYNOMIAL and mx.default_device() == mx.cpu


def _poly_exp(x: mx.array) -> mx.array:
    n = mx.round(mx.clip(x, _X_MIN, _X_MAX) * _LOG2E)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = mx.array(_P[0], mx.float32)
    for c in _P[1:]:
        p = p * r + c
    p = p * r * r + r + 1.0
    two_n = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)
    y = mx.where(x < _X_MIN, 0.0, p * two_n)
    return mx.where(x > _X_MAX, mx.inf, y)


def _single(cotangents):
    return cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents


@mx.custom_function
def _exp_f32(x):
    return _poly_exp(x)


@_exp_f32.vjp
def _exp_f32_vjp(primals, cotangents, outputs):
    return _single(cotangents) * _single(outputs)


@mx.custom_function
def _sigmoid_f32(x):
    return 1.0 / (1.0 + _poly_exp(-x))


@_sigmoid_f32.vjp
def _sigmoid_f32_vjp(primals, cotangents, outputs):
    # s (1 - s) rather than autodiff's e / (1 + e)^2, which is inf / inf for x << 0.
    s = _single(outputs)
    return _single(cotangents) * s * (1.0 - s)


def _in_f32(fn, x: mx.array) -> mx.array:
    return fn(x.astype(mx.float32)).astype(x.dtype)


def exp(x: mx.array) -> mx.array:
    """``e^x`` elementwise (``mx.exp`` off the CPU). ``x > 88.376`` gives ``inf``."""
    return _in_f32(_exp_f32, x) if on_cpu() else mx.exp(x)


def sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + e^{-x})`` elementwise (``mx.sigmoid`` off the CPU)."""
    return _in_f32(_sigmoid_f32, x) if on_cpu() else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)`` (SiLU / swish), as ``mlx.nn.silu``."""
    return x * sigmoid(x)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x``, the same signature as ``mlx_lm.models.activations.swiglu``."""
    return silu(gate) * x


def _shift(x: mx.array, axis: int) -> mx.array:
    # The row max, with +-inf rows shifted by 0 so an all -inf row stays -inf, not nan.
    m = mx.stop_gradient(mx.max(x, axis=axis, keepdims=True))
    return mx.where(mx.isinf(m), 0.0, m)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """``e^{x - max} / sum e^{x - max}`` along ``axis``, reduced in float32.

    Args:
        x: any shape, any float dtype.
        axis: the axis to normalise.

    Returns:
        Same shape and dtype as ``x``.
    """
    if not on_cpu():
        return mx.softmax(x, axis=axis, precise=True)
    e, total = softmax_parts(x, axis=axis)
    return (e / total).astype(x.dtype)


def softmax_parts(x: mx.array, axis: int = -1) -> tuple[mx.array, mx.array]:
    """The unnormalised softmax: ``e = e^{x - max}`` and ``total = sum e`` along ``axis``.

    For callers that divide later, e.g. attention normalising ``e @ v`` instead of ``e``.

    Args:
        x: any shape, any float dtype.
        axis: the axis to reduce.

    Returns:
        ``(e, total)`` float32; ``e`` has ``x``'s shape, ``total`` size 1 along ``axis``.
    """
    z = x.astype(mx.float32)
    e = exp(z - _shift(z, axis))
    return e, e.sum(axis=axis, keepdims=True)


def logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    """``max + log sum e^{x - max}`` along ``axis``, in float32 (as ``mx.logsumexp``).

    Args:
        x: any shape, any float dtype.
        axis: the axis to reduce.
        keepdims: keep ``axis`` with size 1.

    Returns:
        float32 array, ``x``'s shape without ``axis`` (or with size 1 there).
    """
    z = x.astype(mx.float32)
    if not on_cpu():
        return mx.logsumexp(z, axis=axis, keepdims=keepdims)
    m = _shift(z, axis)
    out = m + mx.log(_exp_f32(z - m).sum(axis=axis, keepdims=True))
    return out if keepdims else mx.squeeze(out, axis=axis)
