"""The GRPO loss family in pieces, to recompose (optax's ``optax.losses`` style).

``make_policy_loss(cfg, surrogate=..., reduction=...)`` assembles a policy loss from a
surrogate (``Terms -> (per-token loss, metrics)``) and a reduction (``(per-token loss, mask,
num_items) -> loss``); :data:`LOSSES` is the table of TRL's loss types built from the pieces
below (defined in :mod:`grpo.core.surrogates`; the assembly in :mod:`grpo.core.loss`).
Everything here is a pure function of ``mx.array`` s.
"""

from grpo.core.loss import LossConfig, grpo_loss, make_policy_loss, policy_loss
from grpo.core.surrogates import (
    CLIPPED_LOSS_TYPES,
    LOSS_TYPES,
    LOSSES,
    LossType,
    Terms,
    cispo_surrogate,
    clip_metrics,
    clipped_surrogate,
    gamma_weights,
    global_token_reduction,
    high_entropy_mask,
    kl_k3,
    off_policy_mask,
    sapo_surrogate,
    sequence_log_weights,
    sequence_mean_reduction,
    sequence_sum_reduction,
    token_log_weights,
    token_mean_reduction,
    vespo_surrogate,
)

__all__ = [
    "CLIPPED_LOSS_TYPES", "LOSS_TYPES", "LOSSES", "LossConfig", "LossType", "Terms",
    "cispo_surrogate", "clip_metrics", "clipped_surrogate", "gamma_weights",
    "global_token_reduction", "grpo_loss", "high_entropy_mask", "kl_k3", "make_policy_loss",
    "off_policy_mask", "policy_loss", "sapo_surrogate", "sequence_log_weights",
    "sequence_mean_reduction", "sequence_sum_reduction", "token_log_weights",
    "token_mean_reduction", "vespo_surrogate",
]  # fmt: skip
