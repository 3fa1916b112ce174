"""What a trainer keeps between steps: one copy of the trained weights and their optimizer
state. A stale reference to an earlier state (the initial parameters, a state handed to a
callback) pins a whole copy of the weights and both Adam moments for the run."""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import gc

import mlx.core as mx
from helpers import PROMPTS, tiny_args
from mlx.utils import tree_flatten

from grpo.trainer import GRPOTrainer


def _nbytes(tree) -> int:
    return sum(x.nbytes for _, x in tree_flatten(tree) if isinstance(x, mx.array))


def _reward(completions, **_):
    return [float(len(c) % 3) for c in completions]


class _Keeper:
    """A transformers-style callback that keeps the ``state`` object it was given."""

    def __init__(self):
        self.state = None

    def on_step_end(self, args, state, control, **kwargs):
        self.state = state


def test_a_full_fine_tune_holds_one_state_and_callbacks_see_the_live_one(tiny_model_dir, tmp_path):
    keeper = _Keeper()
    gc.collect()
    before = mx.get_active_memory()  # what earlier tests in this process still hold
    trainer = GRPOTrainer(
        str(tiny_model_dir), _reward, train_dataset=PROMPTS, callbacks=[keeper],
        args=tiny_args(tmp_path, use_lora=False, max_steps=3, beta=0.04, save_strategy="no"),
    )  # fmt: skip
    trainer.train()
    assert trainer.policy.params is None
    assert keeper.state.train is trainer.train_state
    assert keeper.state.global_step == 3
    gc.collect()
    state = trainer.train_state
    params = _nbytes(state.params)
    held = _nbytes(state.params) + _nbytes(state.opt_state) + _nbytes(trainer.policy.ref_params)
    # Anything else the run keeps (data, keys, caches of small arrays) is far below one
    # more copy of the weights; a stale state would add at least that much.
    grown = mx.get_active_memory() - before
    assert grown - held < params / 2, (grown, held, params)
