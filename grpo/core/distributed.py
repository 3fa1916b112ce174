"""Data-parallel helpers over an ``mx.distributed`` group: rank, all-reduced statistics, keys.

Every function takes the group as ``group=`` and treats ``None`` (or a group of size 1) as
a single process: the result is then exactly the local computation, with no collective
launched. (Unlike ``mlx.nn.average_gradients``, ``None`` never means "the global group":
``grpo.core`` does not initialise distributed state; ``grpo.io.dist.init_distributed``
does, and returns ``None`` for a single process.)

The invariant these helpers serve: with ``W`` ranks each holding ``B`` whole prompt groups
(a group of ``G`` completions never spans ranks), the all-reduced statistic equals the one a
single process computes on all ``W * B`` prompts. Means of per-rank means need equal
per-rank sizes, which the prompt sampler's sharding guarantees.

Collectives are ordinary MLX ops: they are lazy, differentiable as constants, and trace
under ``mx.compile``. Every rank must call them in the same order with the same shapes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

Group = mx.distributed.Group

_REDUCERS = ("mean", "sum", "max", "min")


def rank(group: Group | None) -> int:
    """This process's rank in ``group``; 0 when ``group`` is ``None``."""
    return 0 if group is None else group.rank()


def world_size(group: Group | None) -> int:
    """Number of processes in ``group``; 1 when ``group`` is ``None``."""
    return 1 if group is None else group.size()


def is_distributed(group: Group | None) -> bool:
    """True when ``group`` spans more than one process (collectives will communicate)."""
    return world_size(group) > 1


def all_sum(x: mx.array, *, group: Group | None) -> mx.array:
    """Elementwise :math:`\\sum_r x_r` over ranks; ``x`` itself for a single process."""
    return mx.distributed.all_sum(x, group=group) if is_distributed(group) else x


def all_mean(x: mx.array, *, group: Group | None) -> mx.array:
    """Elementwise :math:`\\frac{1}{W} \\sum_r x_r` over the ``W`` ranks."""
    if not is_distributed(group):
        return x
    return mx.distributed.all_sum(x, group=group) / world_size(group)


def all_max(x: mx.array, *, group: Group | None) -> mx.array:
    """Elementwise maximum over ranks."""
    return mx.distributed.all_max(x, group=group) if is_distributed(group) else x


def all_min(x: mx.array, *, group: Group | None) -> mx.array:
    """Elementwise minimum over ranks."""
    return mx.distributed.all_min(x, group=group) if is_distributed(group) else x


def average_gradients(grads: Any, *, group: Group | None) -> Any:
    """Gradient tree averaged over ranks with ``mlx.nn.average_gradients``.

    .. math:: g = \\frac{1}{W} \\sum_r g_r

    Each rank's loss must be normalised so that this mean is the gradient of the global-batch
    loss (see :func:`num_items_in_batch` for the token-level ``dapo`` normaliser).
    """
    return nn.average_gradients(grads, group=group) if is_distributed(group) else grads


def nan_mean_std(x: mx.array, *, group: Group | None, ddof: int = 1) -> tuple[mx.array, mx.array]:
    """NaN-aware mean and standard deviation of every element of ``x`` on every rank.

    .. math::

        \\mu = \\frac{\\sum_{r,i} x_{ri}}{n}, \\qquad
        \\sigma = \\sqrt{\\frac{\\sum_{r,i} (x_{ri} - \\mu)^2}{n - \\text{ddof}}}

    with ``n`` the global count of non-NaN elements (TRL's ``nanstd`` is ``ddof=1``). Two
    passes (mean, then centred squares) so the result matches one process holding the full
    batch to float32 rounding, not the cancelling ``E[x^2] - E[x]^2``.

    Args:
        x: ``[...]`` local values; NaN marks a missing value.
        group: The ranks to reduce over, or ``None`` for this process only.
        ddof: Delta degrees of freedom.

    Returns:
        ``(mean, std)`` float32 scalars, identical on every rank. NaN when no element is
        finite (mean) or ``n <= ddof`` (std).
    """
    x = x.astype(mx.float32)
    valid = ~mx.isnan(x)
    # Shift by a value every rank agrees on (the global max) so that a batch of equal rewards
    # has exactly zero deviation and zero std, as numerics.nanmean guarantees locally.
    ref = all_max(mx.where(valid, x, -mx.inf).max(), group=group)
    ref = mx.where(mx.isfinite(ref), ref, 0.0)
    local = mx.stack([mx.where(valid, x - ref, 0).sum(), valid.sum().astype(mx.float32)])
    total, n = all_sum(local, group=group)
    mean = mx.where(n > 0, ref + total / mx.maximum(n, 1), mx.nan)
    sq = all_sum(mx.where(valid, mx.square(x - mean), 0).sum(), group=group)
    std = mx.where(n > ddof, mx.sqrt(sq / mx.maximum(n - ddof, 1)), mx.nan)
    return mean, std


def num_items_in_batch(mask: mx.array, *, group: Group | None) -> mx.array:
    """Per-rank token normaliser for the ``dapo`` loss: global token count over ``W``.

    .. math:: \\hat n = \\max\\big(1, \\sum_r \\sum_{i,t} m^{(r)}_{it}\\big) / W

    Each rank's loss ``sum_r(l * m) / n_hat`` has mean over ranks ``sum(l * m) / n``, the
    single-process loss on the full batch, so after :func:`average_gradients` the update is
    independent of ``W`` (TRL divides ``num_items_in_batch`` by ``num_processes`` for the
    same reason).

    Args:
        mask: ``[N, T]`` local completion mask (1 for real tokens).
        group: The ranks to reduce over, or ``None``.

    Returns:
        float32 scalar, identical on every rank.
    """
    n = all_sum(mask.astype(mx.float32).sum(), group=group)
    return mx.maximum(n, 1.0) / world_size(group)


def metric_reducer(name: str) -> str:
    """Reducer a metric's name implies: ``"max"``/``"min"`` when its last ``/`` part starts or
    ends with it (``completions/max_length``, ``clip_ratio/low_min``), else ``"mean"``."""
    last = name.rsplit("/", 1)[-1]
    for kind in ("max", "min"):
        if last == kind or last.startswith(kind + "_") or last.endswith("_" + kind):
            return kind
    return "mean"


def _check_same_metrics(how: Mapping[str, str], group: Group) -> None:
    # Collectives pair by call order and size: ranks with different metric names would
    # silently mix values (or hang), so compare a fingerprint first; every rank sees the same
    # max and min and so raises together.
    fp = float(zlib.crc32(repr(sorted(how.items())).encode()) & 0xFFFFFF)  # exact in float32
    hi, neg_lo = mx.distributed.all_max(mx.array([fp, -fp]), group=group).tolist()
    if hi != -neg_lo:
        raise ValueError(
            f"reduce_metrics: ranks passed different metric names or reducers; this rank has "
            f"{sorted(how.items())}"
        )


def _reduce_sums(values: dict, keys: list[str], how: Mapping[str, str], group) -> dict:
    vals = mx.stack([values[k] for k in keys])
    valid = ~mx.isnan(vals)
    sums, counts = all_sum(
        mx.stack([mx.where(valid, vals, 0), valid.astype(mx.float32)]), group=group
    )
    is_mean = mx.array([how[k] == "mean" for k in keys])
    out = mx.where(is_mean, sums / mx.maximum(counts, 1), sums)
    out = mx.where(counts > 0, out, mx.nan)
    return {k: out[i] for i, k in enumerate(keys)}


def _reduce_extreme(values: dict, keys: list[str], kind: str, group) -> dict:
    fill = -mx.inf if kind == "max" else mx.inf
    vals = mx.stack([values[k] for k in keys])
    op = all_max if kind == "max" else all_min
    out = op(mx.where(mx.isnan(vals), fill, vals), group=group)
    out = mx.where(out == fill, mx.nan, out)  # no rank had a value
    return {k: out[i] for i, k in enumerate(keys)}


def reduce_metrics(
    metrics: Mapping[str, mx.array | float],
    *,
    group: Group | None,
    reducers: Mapping[str, str] | None = None,
) -> dict[str, mx.array]:
    """All-reduce a dict of scalar metrics across ranks, ignoring NaN (= "no value here").

    ``mean`` averages over the ranks that have a value, ``sum`` adds them, ``max``/``min``
    take the extreme; the result is NaN when no rank has a value. All means and sums travel
    in one ``all_sum``, maxima and minima in one collective each, after a one-element check
    that every rank passed the same names (so a mismatch raises on every rank instead of
    mixing values or hanging). Evaluates that check eagerly: call it outside ``mx.compile``.

    Args:
        metrics: ``{name: scalar}`` local metrics, the same names on every rank.
        group: The ranks to reduce over, or ``None`` (returns a copy of ``metrics``).
        reducers: ``{name: "mean" | "sum" | "max" | "min"}``; other names use
            :func:`metric_reducer`.

    Returns:
        ``{name: float32 scalar}`` in the order of ``metrics``, identical on every rank.
    """
    reducers = dict(reducers or {})
    unknown = {k: v for k, v in reducers.items() if v not in _REDUCERS}
    if unknown:
        raise ValueError(f"reduce_metrics: reducers must be one of {_REDUCERS}; got {unknown}")
    if not is_distributed(group):
        return dict(metrics)
    how = {k: reducers.get(k) or metric_reducer(k) for k in metrics}
    _check_same_metrics(how, group)
    values = {k: mx.array(v).astype(mx.float32).reshape(()) for k, v in metrics.items()}
    out = {}
    sums = sorted(k for k in how if how[k] in ("mean", "sum"))
    if sums:
        out.update(_reduce_sums(values, sums, how, group))
    for kind in ("max", "min"):
        keys = sorted(k for k in how if how[k] == kind)
        if keys:
            out.update(_reduce_extreme(values, keys, kind, group))
    return {k: out[k] for k in metrics}


def rank_key(key: mx.array, *, rank: int) -> mx.array:
    """This rank's RNG key: ``key`` itself on rank 0, an independent fold of it elsewhere.

    Rank 0 keeps ``key`` so a one-process run draws exactly what it drew before
    distribution existed; rank ``r > 0`` gets ``split(key ^ [0, r])[0]``, which depends only on
    ``key`` and ``r`` (not on the world size).

    Args:
        key: ``[2]`` uint32 key, e.g. ``mx.random.key(seed)``.
        rank: Non-negative rank.

    Returns:
        ``[2]`` uint32 key.
    """
    if rank < 0:
        raise ValueError(f"rank_key: rank must be >= 0, got rank={rank!r}")
    if rank == 0:
        return key
    return mx.random.split(key ^ mx.array([0, rank], dtype=mx.uint32))[0]


def max_divergence(tree: Any, *, group: Group | None) -> mx.array:
    """Largest elementwise spread ``max_r x_r - min_r x_r`` over all leaves of ``tree``.

    Zero when every rank holds the same values, e.g. parameters after a data-parallel step.

    Args:
        tree: A tree of arrays with the same structure and shapes on every rank.
        group: The ranks to compare, or ``None`` (returns 0).

    Returns:
        float32 scalar, identical on every rank.
    """
    leaves = [v.astype(mx.float32).reshape(-1) for _, v in tree_flatten(tree)]
    if not leaves or not is_distributed(group):
        return mx.array(0.0)
    flat = mx.concatenate(leaves)
    return (all_max(flat, group=group) - all_min(flat, group=group)).max()
