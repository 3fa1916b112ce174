"""The traced training state: one NamedTuple of arrays that crosses ``mx.compile``."""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
from mlx.utils import tree_map


class TrainState(NamedTuple):
    """Everything a GRPO optimisation step reads and writes.

    Attributes:
        params: trainable parameter tree (LoRA adapters only, or every weight for a full
            fine-tune); leaves keep the model's dtypes.
        opt_state: the ``mlx.optimizers`` state tree (``step`` uint64 ``[]``,
            ``learning_rate`` float32 ``[]`` and per-parameter moments shaped like ``params``, in
            float32 whatever the weights' dtype).
        key: ``[2]`` uint32 RNG key, split once per step (dropout masks).
        step: ``[]`` int32 number of optimizer steps taken.
    """

    params: Any
    opt_state: Any
    key: mx.array
    step: mx.array


def float32_tree(tree: Any) -> Any:
    """``tree`` with every floating leaf in float32 (the optimizer's working precision)."""
    return tree_map(
        lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x, tree
    )


def init_state(params: Any, optimizer, *, key: mx.array) -> TrainState:
    """A fresh state: ``optimizer`` is initialised on ``params`` and its state copied out.

    Args:
        params: trainable parameter tree.
        optimizer: an ``mlx.optimizers.Optimizer`` (its own state is reset by this call).
        key: ``[2]`` uint32 RNG key.

    Returns:
        ``TrainState`` at step 0.
    """
    lr = optimizer.state.get("learning_rate", mx.array(0.0, mx.float32))
    optimizer.state = {"step": mx.array(0, mx.uint64), "learning_rate": lr}
    # Moments in float32 whatever the weights' dtype (grpo.core.step runs the update in float32).
    optimizer.init(float32_tree(params))
    opt_state = tree_map(lambda x: x, optimizer.state)
    return TrainState(params=params, opt_state=opt_state, key=key, step=mx.array(0, mx.int32))
