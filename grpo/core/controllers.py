"""Run-time controllers applied between optimizer steps (TRL's, as pure functions).

- TR-DPO reference sync (``sync_ref_model``): every ``ref_model_sync_steps`` steps
  :math:`\\theta_{ref} \\leftarrow (1-\\alpha)\\,\\theta_{ref} + \\alpha\\,\\theta`.
- Adaptive entropy bonus (``use_adaptive_entropy``): after each optimizer step the
  coefficient moves by ``delta`` towards raising entropy when the measured entropy is at or
  below ``target`` and lowering the bonus otherwise, clipped to ``[lo, hi]``; the bonus a step
  applies is the coefficient set by the previous step, or 0 while the last measured entropy
  is above ``target``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map


def sync_reference(ref_params: Any, params: Any, *, alpha: float) -> Any:
    """TR-DPO's soft update ``ref * (1 - alpha) + params * alpha`` (leaves keep ref's dtype).

    Args:
        ref_params: reference parameter tree.
        params: policy parameter tree of the same structure.
        alpha: ``ref_model_mixup_alpha`` in ``[0, 1]``.
    """
    return tree_map(
        lambda r, p: (r * (1.0 - alpha) + p.astype(r.dtype) * alpha).astype(r.dtype),
        ref_params,
        params,
    )


def update_entropy_coef(
    coef: float, entropy: float, *, target: float, delta: float, lo: float, hi: float
) -> float:
    """The adaptive coefficient after a step that measured mean entropy ``entropy``."""
    if entropy <= target:
        return min(coef + delta, hi)
    return max(coef - delta, lo)


def applied_entropy_coef(coef: float, last_entropy: float, *, target: float) -> float:
    """The bonus coefficient a step applies: ``coef`` unless the last measured entropy is
    above ``target`` (``inf`` before the first measurement, so the first step applies 0)."""
    return coef if last_entropy <= target else 0.0


def window_entropy(metrics: dict[str, mx.array | float]) -> float:
    """Token-weighted mean entropy of an optimizer step's window, from the loss metrics
    ``entropy/bonus_sum`` and ``entropy/bonus_tokens`` (micro-batch means of sums)."""
    total = float(metrics["entropy/bonus_tokens"])
    return float(metrics["entropy/bonus_sum"]) / max(total, 1e-12)
