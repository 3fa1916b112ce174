"""Graceful interrupts: Ctrl-C (SIGINT) or SIGTERM end training at a safe point, saved.

:class:`InterruptGuard` turns the first signal into a *request*. What the trainer does with
it depends on where the signal lands:

* during generation (sampling prompts, rollout, scoring), nothing the run keeps has changed
  yet, so the work is abandoned at once (``KeyboardInterrupt`` inside
  :meth:`InterruptGuard.abandonable`) and the trainer rolls back to the generation
  boundary;
* during the optimizer steps of a generation batch, the few remaining steps finish (no new
  rollout starts), so the checkpoint sits on a generation boundary and resuming replays the
  same trajectory as an uninterrupted run.

Either way the trainer then writes a checkpoint and raises :class:`TrainingInterrupted`
(a ``KeyboardInterrupt``), which the CLI turns into exit status ``128 + signal`` (130 for
Ctrl-C). A second signal raises :class:`SignalReceived` (a ``KeyboardInterrupt``)
immediately, wherever it lands, with the same exit status; the last complete checkpoint stays
loadable because checkpoints are written atomically.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalReceived(KeyboardInterrupt):
    """A second signal stopped training at once, without saving.

    Attributes:
        signum: the signal number.
    """

    def __init__(self, signum: int):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received a second time: stopped at once without saving; the newest "
            "complete checkpoint in output_dir is intact"
        )
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention for death by signal: ``128 + signum`` (130 for SIGINT)."""
        return 128 + int(self.signum)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving its state.

    Attributes:
        signum: the signal number (``signal.SIGINT`` for Ctrl-C).
        step: optimizer steps completed.
        checkpoint: the checkpoint holding that state (``None`` if no step was taken).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        name = signal.Signals(signum).name
        where = f"; saved {checkpoint}" if checkpoint is not None else "; nothing to save yet"
        super().__init__(f"training interrupted by {name} after step {step}{where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        """The shell convention for death by signal: ``128 + signum`` (130 for SIGINT)."""
        return 128 + int(self.signum)


class InterruptGuard:
    """Context manager catching ``signals`` while training; inert outside the main thread.

    Args:
        enabled: install the handlers (``False``: a guard that never fires, e.g. under
            ``mlx.launch``, where every rank must agree on when to stop).
        signals: the signals to catch.
    """

    def __init__(self, *, enabled: bool = True, signals: tuple[int, ...] = SIGNALS):
        self.enabled, self.signals = enabled, signals
        self.signum: int | None = None
        self._abandonable = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """A signal arrived: stop at the next safe point."""
        return self.signum is not None

    def __enter__(self) -> InterruptGuard:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise SignalReceived(signum)
        self.signum = signum
        if self._abandonable:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def abandonable(self) -> Iterator[None]:
        """A block the caller can roll back: a signal inside it raises ``KeyboardInterrupt``."""
        if self.requested:
            raise KeyboardInterrupt
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False
