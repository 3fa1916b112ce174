"""When a run logs, evaluates and saves: transformers' ``DefaultFlowCallback`` in GRPO steps.

``logging_strategy`` / ``eval_strategy`` / ``save_strategy`` are ``"steps"`` (every
``logging_steps`` / ``eval_steps`` / ``save_steps`` optimizer steps; a value below 1 is a
fraction of the run), ``"epoch"`` (when a pass over the prompts ends) or ``"no"``.
Checkpoints are written only at generation-batch boundaries, so that a resumed run draws the
same prompts: a save that falls due inside a generation batch happens at its end.
"""

from __future__ import annotations

import attrs

from grpo.errors import ConfigError


@attrs.frozen(kw_only=True)
class Flow:
    """Logging, evaluation and checkpoint schedule of one run."""

    max_steps: int
    epoch_steps: int | None  # optimizer steps per epoch (None: unknown, a streamed dataset)
    logging_strategy: str = "steps"
    logging_steps: int = 10
    logging_first_step: bool = False
    eval_strategy: str = "no"
    eval_steps: int = 10
    eval_on_start: bool = False
    save_strategy: str = "steps"
    save_steps: int = 500

    @classmethod
    def from_config(cls, cfg, *, max_steps: int, epoch_steps: int | None) -> Flow:
        """The schedule of ``cfg`` (a ``GRPOConfig``) for a ``max_steps`` run."""
        uses_epochs = "epoch" in (cfg.logging_strategy, cfg.eval_strategy, cfg.save_strategy)
        if uses_epochs and epoch_steps is None:
            raise ConfigError(
                "logging_strategy, eval_strategy or save_strategy 'epoch' needs a dataset of "
                "known length; a streamed train_dataset has no epochs, so use 'steps'"
            )
        return cls(
            max_steps=max_steps,
            epoch_steps=epoch_steps,
            logging_strategy=cfg.logging_strategy,
            logging_steps=cfg.interval("logging_steps", max_steps),
            logging_first_step=cfg.logging_first_step,
            eval_strategy=cfg.eval_strategy,
            eval_steps=cfg.interval("eval_steps", max_steps),
            eval_on_start=cfg.eval_on_start,
            save_strategy=cfg.save_strategy,
            save_steps=cfg.interval("save_steps", max_steps),
        )

    def log_at(self, step: int) -> bool:
        """Write a log record after optimizer step ``step`` (the last step always logs)."""
        if self.logging_strategy == "no":
            return False
        if step == 1 and self.logging_first_step:
            return True
        return step == self.max_steps or (
            self.logging_strategy == "steps" and step % self.logging_steps == 0
        )

    def eval_at(self, step: int) -> bool:
        """Evaluate after optimizer step ``step`` (and at the end of a step-based schedule)."""
        return self.eval_strategy == "steps" and (
            step % self.eval_steps == 0 or step == self.max_steps
        )

    def _crossed(self, every: int | None, before: int, step: int) -> bool:
        return bool(every) and step // every > before // every

    def epoch_ended(self, before: int, step: int) -> bool:
        """An epoch ended between optimizer steps ``before`` and ``step``."""
        return self._crossed(self.epoch_steps, before, step)

    def log_at_boundary(self, before: int, step: int) -> bool:
        """Log at a generation boundary (``"epoch"`` logging)."""
        return self.logging_strategy == "epoch" and self.epoch_ended(before, step)

    def eval_at_boundary(self, before: int, step: int) -> bool:
        """Evaluate at a generation boundary (``"epoch"`` evaluation)."""
        return self.eval_strategy == "epoch" and self.epoch_ended(before, step)

    def save_at_boundary(self, saved_at: int, step: int) -> bool:
        """Checkpoint at a generation boundary, the last save having been at ``saved_at``."""
        if self.save_strategy == "steps":
            return self._crossed(self.save_steps, saved_at, step)
        return self.save_strategy == "epoch" and self.epoch_ended(saved_at, step)

    @property
    def saves(self) -> bool:
        """Whether the run writes checkpoints at all (``save_strategy != "no"``)."""
        return self.save_strategy != "no"
