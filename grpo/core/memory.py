"""How much memory an update step needs, and the micro-batch and head chunk that fit a budget.

.. math:: M(n, c) = M_{\\text{fixed}} + n\\, m_{\\text{row}} + c\\, m_{\\text{elem}}

``M_fixed`` is what does not depend on the micro-batch: weights, gradients, optimizer
state. ``m_row`` is the activation memory of one row of the padded length (prompt +
completion) kept for the backward; it follows ``gradient_checkpointing``. ``c`` is the
number of logits elements the chunked LM head forms at once (``positions * V``) and
``m_elem`` the bytes each costs in the forward and the recomputing backward. The three
coefficients come from measurements of the actual model (:mod:`grpo.io.memory`); this
module only does the arithmetic and the choice, so both can be tested without a model.
"""

from __future__ import annotations

import attrs

# Head chunks tried, largest (fewest passes over the head weights) first.
CHUNK_CHOICES = (1 << 22, 1 << 20, 1 << 18)
GIB = 1 << 30


@attrs.frozen
class MemoryEstimate:
    """Measured coefficients of :func:`step_bytes`, in bytes.

    Attributes:
        fixed: weights, gradients and optimizer state (independent of the micro-batch).
        per_row: activations of one row at the run's padded length.
        per_chunk_element: head memory per logits element of one chunk.
        length: the padded row length (prompt + completion) the rows were measured at.
        completion_length: the completion part of ``length`` (the positions the head sees).
        vocab: ``V``.
    """

    fixed: float
    per_row: float
    per_chunk_element: float
    length: int
    completion_length: int
    vocab: int


def head_elements(est: MemoryEstimate, *, rows: int, chunk_elements: int) -> int:
    """Logits elements one head chunk really holds: whole positions (at least one), never
    more than the micro-batch's ``rows * T`` positions."""
    positions = min(max(1, chunk_elements // est.vocab), rows * est.completion_length)
    return positions * est.vocab


def step_bytes(est: MemoryEstimate, *, rows: int, chunk_elements: int) -> float:
    """Peak bytes of an update step with ``rows`` rows per micro-batch.

    .. math:: M = M_{\\text{fixed}} + n\\, m_{\\text{row}} + c\\, m_{\\text{elem}}
    """
    c = head_elements(est, rows=rows, chunk_elements=chunk_elements)
    return est.fixed + rows * est.per_row + c * est.per_chunk_element


@attrs.frozen
class Fit:
    """A micro-batch size and head chunk that fit, and the bytes they need."""

    rows: int
    chunk_elements: int
    bytes: float


def micro_batch_choices(rows: int) -> list[int]:
    """Micro-batch sizes that split ``rows`` evenly (gradient accumulation makes up the
    rest, with the same update), largest first."""
    return [n for n in range(rows, 0, -1) if rows % n == 0]


def choose(
    est: MemoryEstimate,
    *,
    budget: float,
    rows: int,
    chunks: tuple[int, ...] = CHUNK_CHOICES,
) -> Fit | None:
    """The largest micro-batch (then the largest head chunk) whose step fits ``budget``.

    Args:
        est: the measured :class:`MemoryEstimate`.
        budget: bytes available.
        rows: the configured micro-batch (``per_device_train_batch_size``); smaller ones
            are its divisors, with gradient accumulation making up the rest.
        chunks: head chunk sizes to try (logits elements), largest first.

    Returns:
        The :class:`Fit`, or ``None`` when even one row with the smallest chunk is too big.
    """
    for n in micro_batch_choices(rows):
        for c in chunks:
            need = step_bytes(est, rows=n, chunk_elements=c)
            if need <= budget:
                return Fit(n, c, need)
    return None


def _gb(x: float) -> str:
    return f"{x / GIB:.3g} GB"


def refusal(est: MemoryEstimate, *, budget: float, checkpointing: bool, chunks=CHUNK_CHOICES):
    """Why nothing fits, with the smallest step's need and the knobs that would help."""
    least = step_bytes(est, rows=1, chunk_elements=min(chunks))
    knobs = [f"max_memory_gb >= {least / GIB:.3g}"]
    if not checkpointing:
        knobs.append("gradient_checkpointing=True (keeps one block's activations, not all)")
    knobs.append(f"a shorter max_completion_length (rows of {est.length} tokens need "
                 f"{_gb(est.per_row)} each)")  # fmt: skip
    if est.fixed > budget:
        knobs.append("use_lora=True (weights, gradients and optimizer state alone need "
                     f"{_gb(est.fixed)})")  # fmt: skip
    return (
        f"max_memory_gb={budget / GIB:.3g}: the smallest update step (1 row per micro-batch, "
        f"head chunks of {min(chunks)} logits) needs {_gb(least)} "
        f"(fixed {_gb(est.fixed)} + {_gb(est.per_row)} per row). "
        f"To fit: {'; or '.join(knobs)}"
    )
