"""Warnings about rewards that train nothing, raised while training goes on.

- Every reward function returned ``None`` for a row: TRL's warning, with its wording, once
  per run (that row gets advantage 0).
- Every group had zero reward variance for ``patience`` optimizer steps in a row: all
  advantages were 0, so those steps changed nothing but the KL/entropy terms. Said once per
  run, with what usually causes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger("grpo")

ZERO_VARIANCE_PATIENCE = 10  # optimizer steps


class RewardWatch:
    """Feed it every scored generation batch (:meth:`see`); it logs each warning once."""

    def __init__(self, *, patience: int | None = None):
        self.patience = ZERO_VARIANCE_PATIENCE if patience is None else patience
        self.zero_variance_steps = 0
        self.warned_none = self.warned_variance = False

    def see(
        self,
        rewards_per_func: np.ndarray,
        *,
        frac_zero_std: float,
        steps: int,
        prompts: Sequence,
        completions: Sequence,
        columns: Mapping[str, Sequence],
    ) -> None:
        """Args: ``rewards_per_func [N, F]`` (NaN = None), the batch's
        ``frac_reward_zero_std``, the optimizer steps it trains, and its rows."""
        all_none = np.isnan(rewards_per_func).all(axis=1)
        if all_none.any() and not self.warned_none:
            self.warned_none = True
            i = int(np.flatnonzero(all_none)[0])
            row = {k: v[i] for k, v in columns.items()}
            row["prompt"], row["completion"] = prompts[i], completions[i]
            logger.warning(
                f"All reward functions returned None for the following kwargs:\n{row}\n"
                "Please ensure that at least one reward function returns a valid reward."
            )
        self.zero_variance_steps = self.zero_variance_steps + steps if frac_zero_std >= 1 else 0
        if self.zero_variance_steps >= self.patience and not self.warned_variance:
            self.warned_variance = True
            logger.warning(
                f"every group's rewards have had zero variance for {self.zero_variance_steps} "
                "steps in a row: all advantages are 0 and the policy is not learning from the "
                "rewards. Check that the reward functions can tell completions apart (do they "
                "always return the same value?), or raise temperature or num_generations."
            )
