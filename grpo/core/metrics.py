"""Evaluation metrics over ``n`` sampled completions per prompt: pure NumPy, no I/O.

Inputs are per-prompt arrays: ``correct`` ``[B, n]`` bool (a completion counts as correct),
``rewards`` ``[B, n]`` float, ``lengths`` ``[B, n]`` completion tokens and ``truncated``
``[B, n]`` bool. Every function returns plain floats (or ``[B]`` arrays), so results go
straight into ``eval.json``.

- pass@k is the Codex paper's unbiased estimator (Chen et al. 2021, eq. 1 and Fig. 3),
  averaged over prompts; at ``k = 1`` it is the mean accuracy ``c / n``.
- mean@k is the expected mean reward of ``k`` samples; every sample is exchangeable, so
  its unbiased estimate is the mean over all ``n``.
- The paired bootstrap resamples *prompts* (the same indices for both models), which is
  the unit that varies between evaluations; completions stay attached to their prompt.

RNG is explicit: the bootstrap takes a ``seed`` and the same seed gives the same interval.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples.

    .. math:: \\text{pass@}k = 1 - \\binom{n - c}{k} \\Big/ \\binom{n}{k}
        = 1 - \\prod_{i = n - c + 1}^{n} \\Big(1 - \\frac{k}{i}\\Big)

    Args:
        n: samples drawn (``n >= k``).
        c: correct samples (``0 <= c <= n``).
        k: budget.

    Returns:
        A float in ``[0, 1]``.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    # The product form never builds a binomial coefficient, so it cannot overflow.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_per_prompt(correct: np.ndarray, k: int) -> np.ndarray:
    """``[B]`` pass@k of each prompt from ``correct`` ``[B, n]``."""
    correct = _two_d(correct, "correct")
    n = correct.shape[1]
    return np.array([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)], dtype=np.float64)


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """pass@k averaged over prompts; ``correct`` is ``[B, n]`` bool."""
    return float(pass_at_k_per_prompt(correct, k).mean())


def mean_at_k(rewards: np.ndarray, k: int) -> float:
    """Expected mean reward of ``k`` samples per prompt, averaged over prompts.

    .. math:: \\text{mean@}k = \\frac{1}{B} \\sum_b \\frac{1}{n} \\sum_i r_{b,i}

    Samples are exchangeable, so the mean over all ``n >= k`` is the unbiased estimate;
    ``k`` is checked, not used.
    """
    rewards = _two_d(rewards, "rewards")
    if not 1 <= k <= rewards.shape[1]:
        raise ValueError(f"mean_at_k needs 1 <= k <= n, got k={k}, n={rewards.shape[1]}")
    return float(np.nanmean(rewards))


def mean_length(lengths: np.ndarray) -> float:
    """Mean completion length in tokens."""
    return float(np.mean(np.asarray(lengths, dtype=np.float64)))


def truncation_rate(truncated: np.ndarray) -> float:
    """Fraction of completions that hit ``max_completion_length`` without ending."""
    return float(np.mean(np.asarray(truncated, dtype=np.float64)))


def accuracy(correct: np.ndarray) -> float:
    """Fraction of correct completions (greedy accuracy when each prompt has one)."""
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


class Interval(NamedTuple):
    """A point estimate with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval for ``mean(b) - mean(a)`` over paired prompts.

    .. math:: \\hat\\Delta = \\frac{1}{B} \\sum_b (y_b - x_b), \\quad
        \\hat\\Delta^{*}_r = \\frac{1}{B} \\sum_b (y_{s_{rb}} - x_{s_{rb}}),
        \\; s_{rb} \\sim U\\{0..B-1\\}

    Args:
        a: ``[B]`` per-prompt scores of the reference model.
        b: ``[B]`` per-prompt scores of the compared model, same prompts in the same order.
        num_resamples: bootstrap resamples ``R``.
        confidence: two-sided coverage of the interval.
        seed: the same seed gives the same interval.

    Returns:
        ``Interval(estimate, low, high)``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"paired_bootstrap needs two non-empty [B] arrays of one shape, got {a.shape}, {b.shape}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(num_resamples, diff.size))
    means = diff[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(diff.mean()), float(low), float(high))


def _two_d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be [B, n] with n >= 1, got shape {x.shape}")
    return x
