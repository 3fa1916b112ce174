"""Test hook: a run that signals itself at an exact optimizer step.

Setting ``GRPO_TEST_SIGNAL_AT_STEP`` to comma-separated ``STEP:SIGNAL`` pairs (``7:KILL``,
``10:INT``, ``2:TERM,2:TERM``) makes the trainer send each ``SIGNAL`` to its own process,
in order, when optimizer step ``STEP`` ends (after the ``on_step_end`` callbacks). Tests
that kill or interrupt a real ``grpo train`` subprocess use it to land the signal at a
chosen step on any machine, instead of racing the process with a timer. Unset, nothing
happens.
"""

from __future__ import annotations

import os
import signal

from grpo.errors import ConfigError

ENV = "GRPO_TEST_SIGNAL_AT_STEP"


def parse(spec: str) -> dict[int, list[signal.Signals]]:
    """``"7:KILL,10:INT"`` as ``{7: [SIGKILL], 10: [SIGINT]}``."""
    plan: dict[int, list[signal.Signals]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        step, _, name = item.partition(":")
        try:
            signum = signal.Signals[f"SIG{name.strip().upper().removeprefix('SIG')}"]
            plan.setdefault(int(step), []).append(signum)
        except (KeyError, ValueError):
            raise ConfigError(f"{ENV}={spec!r}: expected STEP:SIGNAL pairs, got {item!r}") from None
    return plan


class SignalAtSteps:
    """A trainer callback sending the planned signals to this process."""

    def __init__(self, plan: dict[int, list[signal.Signals]]):
        self.plan = plan

    def on_step_end(self, trainer, step: int, metrics) -> None:
        for signum in self.plan.get(step, ()):
            os.kill(os.getpid(), signum)


def from_environment() -> SignalAtSteps | None:
    """The callback ``GRPO_TEST_SIGNAL_AT_STEP`` asks for, or ``None`` when it is unset."""
    spec = os.environ.get(ENV, "")
    return SignalAtSteps(parse(spec)) if spec.strip() else None
