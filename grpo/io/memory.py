"""Measure a model's update-step memory (:class:`grpo.core.memory.MemoryEstimate`).

Three forward + backward passes of the GRPO loss on synthetic rows of the run's padded
length, each closed by ``mx.eval`` and read with ``mx.get_peak_memory``:

- 1 row, head chunk ``c``;  2 rows, chunk ``c``: the difference is one row's activations;
- 1 row, chunk ``c / 4``: the difference is the head chunk's share.

What does not depend on the micro-batch is the weights (counted from the arrays),
the gradients (inside every probe) and the optimizer state (two float32 moments and a
float32 working copy per trainable weight, counted from the parameter sizes).
"""

from __future__ import annotations

import math

import attrs
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from grpo.core.batch import LossBatch, pack
from grpo.core.loss import grpo_loss
from grpo.core.memory import CHUNK_CHOICES, MemoryEstimate, head_elements

# Bytes of optimizer state per trainable element: Adam's m and v and a float32 update copy.
OPTIMIZER_BYTES_PER_ELEMENT = 12


def _batch(rows: int, P: int, T: int, vocab: int) -> LossBatch:
    rng = np.random.default_rng(0)
    high = max(4, min(vocab, 100))
    prompts = mx.array(rng.integers(3, high, (rows, P)), dtype=mx.int32)
    lengths = mx.full((rows,), P, mx.int32)
    completions = mx.array(rng.integers(3, high, (rows, T)), dtype=mx.int32)
    return LossBatch(
        pack(prompts, lengths, completions),
        lengths,
        completions,
        mx.ones((rows, T), mx.float32),
        mx.array(rng.standard_normal(rows).astype(np.float32)),
    )


def _peak(model, params, loss_cfg, batch) -> float:
    def run():
        fn = mx.value_and_grad(lambda p: grpo_loss(p, None, batch, model=model, cfg=loss_cfg)[0])
        return fn(params)

    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(run())
    mx.synchronize()
    out = mx.get_peak_memory() - base
    model.update(params)
    return float(out)


def tree_bytes(tree) -> int:
    """Bytes of the arrays in ``tree`` (``None`` counts 0)."""
    return 0 if tree is None else sum(x.nbytes for _, x in tree_flatten(tree))


def measure(
    model,
    params,
    loss_cfg,
    *,
    prompt_length: int,
    completion_length: int,
    vocab: int,
    resident_bytes: int,
):
    """The :class:`MemoryEstimate` of ``model`` training ``params`` under ``loss_cfg``.

    Args:
        model: the prepared policy (LoRA inserted, checkpointing set), in train mode.
        params: the trainable tree.
        loss_cfg: the run's :class:`grpo.core.loss.LossConfig` (``beta`` is ignored: the
            reference log-probs are computed outside the step).
        prompt_length, completion_length: the padded lengths of a row.
        vocab: the vocabulary size (for the synthetic token ids).
        resident_bytes: the weights held throughout (the model's and a separate reference
            copy's), counted from the arrays rather than the process's active memory so
            that other models in the process do not count.
    """
    P, T = prompt_length, completion_length
    cfg = attrs.evolve(loss_cfg, beta=0.0, prompt_share=1)
    big, small = CHUNK_CHOICES[0], CHUNK_CHOICES[0] // 4
    one = _peak(model, params, attrs.evolve(cfg, head_chunk_elements=big), _batch(1, P, T, vocab))
    two = _peak(model, params, attrs.evolve(cfg, head_chunk_elements=big), _batch(2, P, T, vocab))
    less = _peak(
        model, params, attrs.evolve(cfg, head_chunk_elements=small), _batch(1, P, T, vocab)
    )
    shape = MemoryEstimate(0.0, 0.0, 0.0, length=P + T, completion_length=T, vocab=vocab)
    big_used = head_elements(shape, rows=1, chunk_elements=big)
    small_used = head_elements(shape, rows=1, chunk_elements=small)
    # A row too short to fill more than one small chunk leaves nothing to tell apart.
    per_elem = (one - less) / (big_used - small_used) if big_used > small_used else 0.0
    per_elem = max(0.0, per_elem)
    per_row = max(0.0, two - one)
    trainable = sum(math.prod(x.shape) for _, x in tree_flatten(params))
    shared = max(0.0, one - per_row - per_elem * big_used)
    fixed = resident_bytes + OPTIMIZER_BYTES_PER_ELEMENT * trainable + shared
    return attrs.evolve(shape, fixed=float(fixed), per_row=per_row, per_chunk_element=per_elem)
