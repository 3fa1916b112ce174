"""Multi-turn rollout: model turns interleaved with tokens the caller appends (tool results).

``multiturn_rollout`` samples every row's first turn with a :class:`grpo.core.rollout.Sampler`
(the built-in ``rollout`` by default), hands each row's new segment to a ``respond`` callback,
appends the token ids the callback returns (a tool result rendered by the chat template, plus
the template's glue up to the next assistant header) and samples the next turn from
``prompt ++ completion so far``. Core stays free of tokenizers and I/O: parsing and running
tool calls happen in the callback (:mod:`grpo.agent` is the trainer's).

Invariants, each a test in ``tests/test_multiturn.py``:

- Token ids are only ever appended: a row's ids after turn ``k`` are a prefix of its ids after
  turn ``k + 1``, and no earlier token is re-tokenised.
- ``tool_mask`` is 1 exactly on tokens the model sampled; ``logprobs`` are their sampling
  log-probs and 0 on appended tokens, so the loss and the KL see only the model's tokens.
- The completion budget ``sampling.max_tokens`` covers model and appended tokens together
  (TRL's ``max_completion_length``): an appended segment that would leave no room for a
  model token is dropped and the row ends there, as TRL rolls such a tool result back.
- Rows that are done are never sampled again: each later turn prefills only the live rows'
  contexts (one row per context, ``group_size = 1``), so finished rows cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from grpo.core.rollout import Rollout, Sampler, rollout
from grpo.core.sampling import SamplingConfig


class Turn(NamedTuple):
    """One row's segment of one model turn, as the ``respond`` callback sees it."""

    row: int  # index of the row in [0, N), group-contiguous as in Rollout
    ids: list[int]  # the tokens the model sampled in this turn (EOS / stop included)
    ended: bool  # the turn ended with EOS or a stop sequence (False: it hit the budget)
    final: bool  # the row cannot continue (budget spent, not ended, or max_turns reached)
    room: int  # completion tokens left after this turn


# respond(turn_index, turns) -> one entry per turn: token ids to append before the next model
# turn, or None to end that row. Entries for turns marked ``final`` are ignored.
Respond = Callable[[int, list[Turn]], Sequence[Sequence[int] | None]]


class MultiTurnRollout(NamedTuple):
    """``N = B * G`` multi-turn completions.

    Attributes:
        rollout: a :class:`Rollout` whose ``completion_ids`` hold every completion token (model
            turns and appended ones, in order), ``logprobs`` the sampling log-probs of model
            tokens (0 on appended ones) and ``completion_mask`` 1 on every completion token.
        tool_mask: ``[N, T]`` float32, 1 on tokens the model sampled, 0 on appended tokens
            and padding.
        num_turns: ``[N]`` int32, model turns per row (``>= 1``).
    """

    rollout: Rollout
    tool_mask: mx.array
    num_turns: mx.array


class _Row:
    __slots__ = ("ids", "logprobs", "mask", "turns", "ended")

    def __init__(self):
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.mask: list[float] = []
        self.turns = 0
        self.ended = False

    def add(self, ids, logprobs, *, sampled: bool):
        self.ids += list(ids)
        self.logprobs += list(logprobs) if sampled else [0.0] * len(ids)
        self.mask += [1.0 if sampled else 0.0] * len(ids)


def _segments(roll: Rollout) -> list[tuple[list[int], list[float], bool]]:
    ids, lps = np.array(roll.completion_ids), np.array(roll.logprobs)
    lengths, truncated = np.array(roll.completion_lengths), np.array(roll.is_truncated)
    return [
        (ids[i, :n].tolist(), lps[i, :n].tolist(), not bool(truncated[i]))
        for i, n in enumerate(lengths)
    ]


def _turn_budget(rooms: list[int], cap: int) -> int:
    # A power of two at least as large as the longest room keeps the sampler's compiled
    # shapes to a few variants; each row is then cut to its own room.
    return min(cap, 1 << max(0, int(np.ceil(np.log2(max(rooms))))))


def multiturn_rollout(
    params: dict,
    key: mx.array,
    prompts: list[list[int]],
    *,
    model: nn.Module,
    sampling: SamplingConfig,
    respond: Respond,
    max_turns: int | None = None,
    sampler: Sampler | None = None,
) -> MultiTurnRollout:
    """Sample ``G`` multi-turn completions per prompt, appending what ``respond`` returns.

    .. math:: c_i = y^{(1)}_i \\, u^{(1)}_i \\, y^{(2)}_i \\, u^{(2)}_i \\cdots y^{(K_i)}_i,
        \\quad y^{(k)}_i \\sim \\pi_\\theta(\\cdot \\mid x_i, y^{(1)}_i, \\dots, u^{(k-1)}_i)

    where :math:`u^{(k)}_i` are the appended ids (``tool_mask`` 0) and :math:`y^{(k)}_i` the
    model's turns (``tool_mask`` 1).

    Args:
        params: Model parameters, as for :func:`grpo.core.rollout.rollout`.
        key: RNG key; turn ``k`` samples with the ``k``-th split of it.
        prompts: ``B`` lists of token ids.
        model: The policy.
        sampling: Sampling knobs; ``max_tokens`` bounds each row's whole completion.
        respond: ``respond(turn_index, turns)`` (see :class:`Turn`) returns, per turn, the ids
            to append (the caller's rendering of tool results, ending where the model's next
            turn starts) or ``None`` to end the row.
        max_turns: Most model turns per row (``None``: until ``respond`` ends the row or the
            budget is spent).
        sampler: What samples each turn (any :class:`Sampler`; ``None``: ``rollout``).

    Returns:
        :class:`MultiTurnRollout` with ``N = B * G`` rows.
    """
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
    sampler = rollout if sampler is None else sampler
    G, budget = sampling.group_size, sampling.max_tokens
    key, sub = mx.random.split(key)
    first = sampler(params, sub, prompts, model=model, sampling=sampling)
    rows = [_Row() for _ in range(len(prompts) * G)]
    live = list(range(len(rows)))
    segments = _segments(first)
    turn = 0
    while live:
        turn += 1
        turns = []
        for i, (ids, lps, ended) in zip(live, segments, strict=True):
            row = rows[i]
            row.add(ids, lps, sampled=True)
            row.turns, row.ended = turn, ended
            room = budget - len(row.ids)
            final = not ended or room <= 0 or (max_turns is not None and turn >= max_turns)
            turns.append(Turn(i, ids, ended, final, room))
        deltas = list(respond(turn, turns))
        if len(deltas) != len(turns):
            raise ValueError(f"respond returned {len(deltas)} entries for {len(turns)} turns")
        live = []
        for t, delta in zip(turns, deltas, strict=True):
            if t.final or delta is None or len(delta) >= t.room:
                continue
            rows[t.row].add(list(delta), (), sampled=False)
            live.append(t.row)
        if not live:
            break
        key, sub = mx.random.split(key)
        segments = _next_turn(params, sub, prompts, rows, live, G, model, sampler, sampling)
    return _assemble(first, rows, sampling)


def _next_turn(params, key, prompts, rows, live, G, model, sampler, sampling):
    rooms = [sampling.max_tokens - len(rows[i].ids) for i in live]
    contexts = [list(prompts[i // G]) + rows[i].ids for i in live]
    turn_sampling = attrs.evolve(
        sampling, group_size=1, max_tokens=_turn_budget(rooms, sampling.max_tokens)
    )
    out = sampler(params, key, contexts, model=model, sampling=turn_sampling)
    segments = []
    for (ids, lps, ended), room in zip(_segments(out), rooms, strict=True):
        if len(ids) > room:  # sampled past this row's room: cut, and it did not end
            ids, lps, ended = ids[:room], lps[:room], False
        segments.append((ids, lps, ended))
    return segments


def _assemble(first: Rollout, rows: list[_Row], sampling: SamplingConfig) -> MultiTurnRollout:
    N = len(rows)
    T = max(1, max(len(r.ids) for r in rows))
    ids = np.zeros((N, T), np.int32)
    logprobs = np.zeros((N, T), np.float32)
    tool_mask = np.zeros((N, T), np.float32)
    mask = np.zeros((N, T), np.float32)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n], logprobs[i, :n], tool_mask[i, :n], mask[i, :n] = r.ids, r.logprobs, r.mask, 1
    lengths = mask.sum(-1).astype(np.int32)
    roll = first._replace(
        completion_ids=mx.array(ids),
        logprobs=mx.array(logprobs),
        completion_mask=mx.array(mask),
        is_truncated=mx.array([not r.ended for r in rows]),
        completion_lengths=mx.array(lengths),
    )
    turns = mx.array([r.turns for r in rows], dtype=mx.int32)
    return MultiTurnRollout(roll, mx.array(tool_mask), turns)
