"""transformers' training events for :class:`grpo.GRPOTrainer`: state, control, dispatch.

A callback is either a ``transformers.TrainerCallback`` (or any object whose event methods
take ``(args, state, control, **kwargs)``), called exactly as transformers' Trainer calls it
(``on_train_begin``, ``on_step_end``, ``on_log``, ``on_evaluate``, ``on_save``,
``on_train_end``, ...), or a plain object with the older mlx-grpo signature
``on_step_end(trainer, step, metrics)``, ``on_log(trainer, logs)``,
``on_save(trainer, path)``, ``on_evaluate(trainer, metrics)``, ``on_train_begin(trainer)``,
``on_train_end(trainer)``. A transformers-style callback stops training by setting
``control.should_training_stop = True`` (at the next generation-batch boundary).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import attrs

from grpo.core.state import TrainState


@attrs.define
class TrainerControl:
    """transformers' ``TrainerControl`` flags that a callback may set."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False


@attrs.define(eq=False)
class TrainerState:
    """transformers' ``TrainerState`` for a GRPO run, plus the arrays it trains.

    ``global_step``, ``max_steps``, ``epoch``, ``log_history`` (every logged record, as
    transformers keeps it), ``num_train_epochs``, ``logging_steps``, ``eval_steps``,
    ``save_steps``, ``train_batch_size``, ``is_world_process_zero``. The traced
    :class:`grpo.core.state.TrainState` is ``train``; its fields ``params``, ``opt_state``,
    ``key`` and ``step`` read through.

    ``train`` is read from ``read_train`` at every access, so a callback that keeps this
    object sees the live state, and the object itself never holds an old state's arrays
    (which would keep a whole copy of the parameters and optimizer moments alive).
    """

    read_train: Callable[[], TrainState] = attrs.field(repr=False)
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list[dict] = attrs.Factory(list)
    num_train_epochs: float = 0.0
    logging_steps: int = 0
    eval_steps: int = 0
    save_steps: int = 0
    train_batch_size: int = 0
    is_world_process_zero: bool = True
    is_local_process_zero: bool = True
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    max_completion_length: int | None = None  # for length-aware rewards (trainer_state=)

    @property
    def train(self) -> TrainState:
        return self.read_train()

    @property
    def global_step(self) -> int:
        return int(self.train.step.item())

    @property
    def params(self) -> Any:
        return self.train.params

    @property
    def opt_state(self) -> Any:
        return self.train.opt_state

    @property
    def key(self) -> Any:
        return self.train.key

    @property
    def step(self) -> Any:
        return self.train.step


_TRANSFORMERS_PARAMS = ("args", "state", "control")


def _transformers_style(method) -> bool:
    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return False
    return names[:3] == list(_TRANSFORMERS_PARAMS)


# Keyword arguments transformers passes with each event, from the trainer's names.
_EVENT_KWARGS = {"on_log": "logs", "on_evaluate": "metrics"}


def dispatch(trainer: Any, event: str, *args: Any, callbacks=None) -> TrainerControl:
    """Call ``event`` on ``callbacks`` (default: the trainer's); returns the shared control.

    ``args`` are the legacy positional arguments (``step, metrics`` for ``on_step_end``,
    ``logs`` for ``on_log``, ``path`` for ``on_save``, ``metrics`` for ``on_evaluate``).
    """
    control = trainer.control
    for cb in trainer.callbacks if callbacks is None else callbacks:
        fn = getattr(cb, event, None)
        if fn is None:
            continue
        if not _transformers_style(fn):
            fn(trainer, *args)
            continue
        kwargs = {
            "model": trainer.model,
            "processing_class": trainer.processing_class,
            "optimizer": trainer.optimizer,
            "train_dataloader": None,
            "eval_dataloader": None,
        }
        if event in _EVENT_KWARGS and args:
            kwargs[_EVENT_KWARGS[event]] = args[-1]
        out = fn(trainer.args, trainer.state, control, **kwargs)
        if isinstance(out, TrainerControl) or hasattr(out, "should_training_stop"):
            control = out
    trainer.control = control
    if control.should_training_stop:
        trainer.should_stop = True
    return control
