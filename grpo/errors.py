"""The exceptions grpo raises for user-caused failures, under one base, :class:`GRPOError`.

Each subclass names what the user should look at; ``except grpo.GRPOError`` catches every
one of them. They also subclass the built-in exception earlier releases raised
(``ValueError`` for configuration, data, reward and checkpoint problems,
``FloatingPointError`` for numerics), so existing ``except ValueError`` code keeps working.

An error raised during training after some progress may carry ``checkpoint``: the
directory where the trainer saved the last good state before re-raising it.
"""

from __future__ import annotations

from pathlib import Path


class GRPOError(Exception):
    """Base of every error grpo raises for a problem the user can fix.

    Attributes:
        hint: one short sentence on what to do about it (the CLI prints it after the
            message).
        checkpoint: where the trainer saved the last good state before the failure, if
            it did.
    """

    hint: str = ""
    checkpoint: Path | None = None


class ConfigError(GRPOError, ValueError):
    """An invalid setting, combination of settings, or output directory."""

    hint = "fix the setting named above"


class OutputDirInUse(ConfigError):
    """Another live run holds the output directory's lock."""

    hint = "wait for that run to end, or use another output_dir"


class DataError(GRPOError, ValueError):
    """A dataset row, column or prompt that cannot be trained on."""

    hint = "fix the dataset row named above"


class RewardError(GRPOError, ValueError):
    """A reward function misbehaved: bad output, an exception inside it, a timeout, or a
    missing column."""

    hint = "fix the reward function named above (--debug shows its traceback)"


class CheckpointError(GRPOError, ValueError):
    """A checkpoint is missing, incomplete, unreadable, from another run's settings, or
    cannot be written."""

    hint = "check the checkpoint path and the disk"


class NumericsError(GRPOError, FloatingPointError):
    """A loss, gradient or reward left the finite range; the weights were not updated."""

    hint = "lower learning_rate, check the rewards, or set max_grad_norm"
