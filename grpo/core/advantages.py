"""Group-relative advantages from per-function rewards (TRL 1.16 ``_generate_and_score_completions``).

.. math::

    r_i = \\sum_f w_f R_{i,f} \\;(\\text{NaN terms skipped}), \\qquad
    A_i = \\frac{r_i - \\operatorname{mean}_{j \\in g(i)} r_j}{\\operatorname{std}_{j \\in g(i)} r_j + \\epsilon}

(DeepSeekMath, Shao et al. 2024, Sec. 4.1.2, outcome supervision.) Rows are group-contiguous:
rows ``b*G .. b*G+G-1`` are prompt ``b``'s completions. NaN means "this function does not
apply". Edge cases, all matching TRL 1.16:

- A row where every function is NaN is unscorable: its reward is NaN, it is left out of its
  group's mean and std, and its advantage is 0.
- A group whose rewards are all equal has std 0: every advantage is exactly 0 (not NaN) and
  the rows are flagged in ``is_std_zero`` (``frac_reward_zero_std``). The flag tests the
  std the row was scaled by: the group std for "group" and "none", the batch std (same flag
  on every row) for "batch" and for ``normalize_then_sum``.
- A group with a single scorable row has an undefined unbiased std (NaN, as TRL's
  ``nanstd``), so its advantages become 0 and it is not flagged as zero-std.
- ``group_size == 1``: TRL uses std = 0 for "group"/"none" (an eval-only case there); the
  row is its own group mean, so every advantage is 0. We match this rather than raise.
- ``normalize_then_sum`` (GDPO) ignores ``scale``, as TRL does: each function is
  normalised within its group (std + eps), the weighted nan-sum is then centred and scaled
  by the *batch* mean and unbiased std.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import mlx.core as mx

from grpo.core import distributed as dist
from grpo.core.numerics import nanmean, nanstd, nansum

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
EPS = 1e-4
# torch.isclose(std, 0) with its default atol, which is how TRL flags zero-std rows.
_ZERO_STD_ATOL = 1e-8


class Advantages(NamedTuple):
    advantages: mx.array  # [N] float32, 0 for unscorable rows
    rewards: mx.array  # [N] float32 weighted nan-sum of raw rewards, NaN if unscorable
    is_std_zero: mx.array  # [N] bool, the std used for the row is (close to) 0


def _check_option(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {list(choices)}")


def _check_shapes(rewards_per_func: mx.array, weights: mx.array, group_size: int) -> None:
    if rewards_per_func.ndim != 2 or weights.shape != (rewards_per_func.shape[1],):
        raise ValueError(
            "advantages: expected rewards_per_func [N, F] and weights [F]; got "
            f"rewards_per_func.shape={tuple(rewards_per_func.shape)}, "
            f"weights.shape={tuple(weights.shape)}"
        )
    N = rewards_per_func.shape[0]
    if N == 0 or N % group_size != 0:
        raise ValueError(
            f"advantages: N={N} rows (rewards_per_func.shape={tuple(rewards_per_func.shape)}) "
            f"is not a positive multiple of group_size={group_size}"
        )


def weighted_rewards(rewards_per_func: mx.array, weights: mx.array) -> mx.array:
    """Weighted nan-sum over reward functions; NaN for rows where every function is NaN.

    .. math:: r_i = \\sum_{f : R_{i,f} \\ne \\text{NaN}} w_f R_{i,f}

    Args:
        rewards_per_func: ``[N, F]``, NaN = not applicable.
        weights: ``[F]``.

    Returns:
        ``[N]`` float32 rewards (TRL's logged ``reward``).
    """
    return _weighted_nansum(rewards_per_func, weights, _unscorable(rewards_per_func))


def _unscorable(rewards_per_func: mx.array) -> mx.array:
    return mx.isnan(rewards_per_func).all(axis=1)


def _weighted_nansum(values: mx.array, weights: mx.array, unscorable: mx.array) -> mx.array:
    total = nansum(values.astype(mx.float32) * weights.astype(mx.float32), axis=1)
    return mx.where(unscorable, mx.nan, total)


def _std_or_zero(x: mx.array, axis, n: int) -> mx.array:
    # TRL replaces the std of a single sample by 0 (`if num_generations > 1 ... else zeros`).
    if n > 1:
        return nanstd(x, axis, keepdims=True)
    return mx.zeros_like(nanmean(x, axis, keepdims=True))


def _group_spread(grouped: mx.array, *, eps: float):
    std = _std_or_zero(grouped, 1, grouped.shape[1])
    return std + eps, std


def _batch_mean_std(x: mx.array, *, group=None):
    # Groups are rank-local; the batch statistics span every rank's rows.
    if dist.is_distributed(group):
        return dist.nan_mean_std(x, group=group)
    return nanmean(x), _std_or_zero(x, None, x.size)


def _batch_spread(grouped: mx.array, *, eps: float, group=None):
    std = _batch_mean_std(grouped, group=group)[1].reshape(1, 1)
    return std + eps, std


def _no_spread(grouped: mx.array, *, eps: float):
    # "none" only centres; the group std is still computed for the zero-std flag, as in TRL.
    return mx.ones((1, 1), mx.float32), _std_or_zero(grouped, 1, grouped.shape[1])


def _sum_then_normalize(rewards_per_func, weights, *, group_size: int, spread: Callable):
    rewards = weighted_rewards(rewards_per_func, weights)
    grouped = rewards.reshape(-1, group_size)  # [B, G]
    divisor, std = spread(grouped)
    adv = (grouped - nanmean(grouped, 1, keepdims=True)) / divisor
    return _finish(adv, rewards, std)


def _normalize_then_sum(rewards_per_func, weights, *, group_size: int, eps: float, group=None):
    N, F = rewards_per_func.shape
    unscorable = _unscorable(rewards_per_func)
    grouped = rewards_per_func.astype(mx.float32).reshape(-1, group_size, F)  # [B, G, F]
    per_func = (grouped - nanmean(grouped, 1, keepdims=True)) / (
        _std_or_zero(grouped, 1, group_size) + eps
    )
    # A scorable row whose normalised terms are all NaN (a function seen once in the group has
    # NaN std) sums to 0, not NaN: TRL masks only rows whose *raw* rewards are all NaN.
    summed = _weighted_nansum(per_func.reshape(N, F), weights, unscorable)
    mean, std = _batch_mean_std(summed, group=group)
    adv = (summed - mean) / (std + eps)
    return _finish(adv, _weighted_nansum(rewards_per_func, weights, unscorable), std)


def _finish(adv: mx.array, rewards: mx.array, std: mx.array) -> Advantages:
    # adv is [B, G] or [N]; std broadcasts against it ([B, 1], [1, 1] or [1]).
    N = rewards.shape[0]
    is_std_zero = mx.broadcast_to(mx.abs(std) <= _ZERO_STD_ATOL, adv.shape).reshape(N)
    # Unscorable rows and undefined (NaN) stds give NaN here; TRL's nan_to_num makes them 0.
    return Advantages(mx.nan_to_num(adv, nan=0.0).reshape(N), rewards, is_std_zero)


def make_advantages(
    *,
    group_size: int,
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    eps: float = EPS,
    group: mx.distributed.Group | None = None,
) -> Callable[[mx.array, mx.array], Advantages]:
    """Build ``f(rewards_per_func [N, F], weights [F]) -> Advantages`` for one variant.

    .. math:: A_i = (r_i - \\bar r_{g(i)}) / (s + \\epsilon)

    with ``s`` the unbiased nan-std of the row's group (``scale="group"``), of the whole batch
    (``"batch"``), or no division at all (``"none"``). ``aggregation="normalize_then_sum"``
    (GDPO, arXiv:2601.05242) normalises each function within its group first, then centres
    and scales the weighted sum over the batch; it ignores ``scale``, as TRL 1.16 does.

    Args:
        group_size: ``G``, completions per prompt (rows are group-contiguous).
        scale: ``"group"``, ``"batch"`` or ``"none"`` (TRL ``scale_rewards``).
        aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"`` (TRL
            ``multi_objective_aggregation``).
        eps: added to the std before dividing (TRL: 1e-4).
        group: ``mx.distributed`` group of data-parallel ranks (``None``: one process).
            Each rank passes its own whole groups; the batch statistics of ``"batch"`` and
            ``"normalize_then_sum"`` are then all-reduced, so every rank gets the
            advantages one process holding all ranks' rows would compute.

    Returns:
        A pure function of arrays, safe to use under ``mx.compile``.
    """
    _check_option("scale", scale, SCALES)
    _check_option("aggregation", aggregation, AGGREGATIONS)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got group_size={group_size!r}")
    if aggregation == "normalize_then_sum":
        core = partial(_normalize_then_sum, group_size=group_size, eps=eps, group=group)
    else:
        spread = {
            "group": _group_spread,
            "batch": partial(_batch_spread, group=group),
            "none": _no_spread,
        }[scale]
        core = partial(_sum_then_normalize, group_size=group_size, spread=partial(spread, eps=eps))

    def advantages_fn(rewards_per_func: mx.array, weights: mx.array) -> Advantages:
        _check_shapes(rewards_per_func, weights, group_size)
        return core(rewards_per_func, weights)

    return advantages_fn


def advantages(
    rewards_per_func: mx.array,
    weights: mx.array,
    *,
    group_size: int,
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    eps: float = EPS,
    group: mx.distributed.Group | None = None,
) -> Advantages:
    """Group-relative advantages; see :func:`make_advantages` for the variants.

    .. math:: A_i = (r_i - \\bar r_{g(i)}) / (s + \\epsilon)

    Args:
        rewards_per_func: ``[N, F]`` rewards, group-contiguous rows, NaN = not applicable.
        weights: ``[F]`` reward-function weights.
        group_size: ``G``; ``N`` must be a multiple of it.
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        eps: added to the std before dividing.
        group: data-parallel ranks whose batch statistics are shared (``None``: one process).

    Returns:
        ``Advantages(advantages [N], rewards [N], is_std_zero [N])``.
    """
    fn = make_advantages(
        group_size=group_size, scale=scale, aggregation=aggregation, eps=eps, group=group
    )
    return fn(rewards_per_func, weights)
