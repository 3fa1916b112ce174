"""Small numerically careful reductions: safe division, masked and NaN-aware statistics.

All reductions return float32 (inputs of lower precision are upcast first). NaN-aware
helpers treat NaN as "missing" (TRL's ``torch.nanmean`` / ``trl.trainer.utils.nanstd``
semantics) and never branch in Python on array values, so they trace under ``mx.compile``.
"""

from __future__ import annotations

import mlx.core as mx

Axis = int | tuple[int, ...] | None


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def safe_div(numerator: mx.array, denominator: mx.array, *, fill: float = 0.0) -> mx.array:
    """``numerator / denominator`` where ``denominator != 0``, else ``fill``.

    The double ``where`` keeps the gradient finite (no ``0/0`` on the untaken branch).

    Args:
        numerator: any shape, broadcastable with ``denominator``.
        denominator: any shape.
        fill: value where the denominator is exactly zero.

    Returns:
        The broadcast quotient.
    """
    zero = denominator == 0
    return mx.where(zero, fill, numerator / mx.where(zero, 1, denominator))


def masked_sum(
    x: mx.array, mask: mx.array, axis: Axis = None, *, keepdims: bool = False
) -> mx.array:
    """``sum(x * mask)`` over ``axis``, in float32; positions with ``mask == 0`` never leak.

    A NaN or inf at a masked position contributes exactly 0 (``x * 0`` would give NaN).

    Args:
        x: ``[...]`` values.
        mask: ``[...]`` broadcastable to ``x``; 0/1 or non-negative weights.
        axis: axes to reduce (all when ``None``).
        keepdims: keep reduced axes with size 1.

    Returns:
        float32 sums.
    """
    mask = _f32(mask)
    return mx.where(mask != 0, _f32(x) * mask, 0.0).sum(axis=axis, keepdims=keepdims)


def masked_mean(
    x: mx.array, mask: mx.array, axis: Axis = None, *, keepdims: bool = False
) -> mx.array:
    """``sum(x * mask) / max(sum(mask), 1)`` over ``axis``, in float32.

    Args:
        x: ``[...]`` values.
        mask: ``[...]`` broadcastable to ``x``; 0/1 or non-negative weights.
        axis: axes to reduce (all when ``None``).
        keepdims: keep reduced axes with size 1.

    Returns:
        float32 means; 0 where the mask is empty.
    """
    mask = mx.broadcast_to(_f32(mask), x.shape)
    count = mask.sum(axis=axis, keepdims=keepdims)
    return masked_sum(x, mask, axis, keepdims=keepdims) / mx.maximum(count, 1.0)


def nan_count(x: mx.array, axis: Axis = None, *, keepdims: bool = False) -> mx.array:
    """Number of non-NaN entries over ``axis`` (float32)."""
    return (~mx.isnan(x)).astype(mx.float32).sum(axis=axis, keepdims=keepdims)


def nansum(x: mx.array, axis: Axis = None, *, keepdims: bool = False) -> mx.array:
    """Sum ignoring NaN (0 when every entry is NaN, like ``torch.nansum``)."""
    x = _f32(x)
    return mx.where(mx.isnan(x), 0.0, x).sum(axis=axis, keepdims=keepdims)


def _nan_reference(x: mx.array, axis: Axis) -> mx.array:
    # Any finite member of the slice; the NaN-aware max, or 0 when there is none.
    ref = mx.max(mx.where(mx.isnan(x), -mx.inf, x), axis=axis, keepdims=True)
    return mx.stop_gradient(mx.where(mx.isfinite(ref), ref, 0.0))


def nanmean(x: mx.array, axis: Axis = None, *, keepdims: bool = False) -> mx.array:
    """Mean of the non-NaN entries over ``axis``; NaN when there are none (``torch.nanmean``).

    .. math:: \\bar x = r + \\frac{1}{n} \\sum_{i \\in \\text{valid}} (x_i - r)

    Shifting by a member ``r`` of the slice makes the mean of equal values exactly that
    value, so a uniform reward group gets exactly zero deviation and zero std in float32.

    Args:
        x: ``[...]`` values, NaN meaning missing.
        axis: axes to reduce (all when ``None``).
        keepdims: keep reduced axes with size 1.

    Returns:
        float32 means.
    """
    x = _f32(x)
    ref = _nan_reference(x, axis)
    n = nan_count(x, axis, keepdims=True)
    mean = ref + nansum(x - ref, axis, keepdims=True) / n  # 0/0 = NaN for an all-NaN slice
    return mean if keepdims else _squeeze(mean, axis, x.ndim)


def nanstd(x: mx.array, axis: Axis = None, *, keepdims: bool = False, ddof: int = 1) -> mx.array:
    """Standard deviation of the non-NaN entries, unbiased by default (TRL's ``nanstd``).

    .. math:: s = \\sqrt{\\frac{1}{n - \\text{ddof}} \\sum_{i \\in \\text{valid}} (x_i - \\bar x)^2}

    NaN when ``n <= ddof`` (e.g. a single valid value with Bessel's correction), exactly as
    ``trl.trainer.utils.nanstd``.

    Args:
        x: ``[...]`` values, NaN meaning missing.
        axis: axes to reduce (all when ``None``).
        keepdims: keep reduced axes with size 1.
        ddof: delta degrees of freedom (1 = unbiased).

    Returns:
        float32 standard deviations.
    """
    x = _f32(x)
    mean = nanmean(x, axis, keepdims=True)
    n = nan_count(x, axis, keepdims=True)
    sq = nansum(mx.square(x - mean), axis, keepdims=True)
    var = mx.where(n > ddof, sq / mx.maximum(n - ddof, 1.0), mx.nan)
    std = mx.sqrt(var)
    return std if keepdims else _squeeze(std, axis, x.ndim)


def _squeeze(x: mx.array, axis: Axis, ndim: int) -> mx.array:
    if axis is None:
        return x.reshape(())
    axes = (axis,) if isinstance(axis, int) else axis
    return x.squeeze([a % ndim for a in axes])
