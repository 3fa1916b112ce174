"""Continuous batching for the rollout: a fixed number of decode slots, refilled as rows end.

.. math:: y_{r,t} = \\operatorname{draw}\\big(\\pi(\\cdot \\mid x_{b(r)}, y_{r,<t}),\\ U_{r,t}\\big),
          \\quad U \\sim \\mathcal{U}(0, 1]^{N \\times T}

Every prompt is prefilled once (its ``G`` rows share that prefill, as in
:func:`grpo.core.rollout.rollout`); rows then enter up to ``S`` decode slots in order,
each slot with its own KV columns, RoPE position and write column, and a row that ends
(EOS, stop sequence or ``max_tokens``) frees its slot for the next row at the next host
check, so the decode batch stays ``S`` wide until the queue is empty. Each row's draws
use its own uniforms ``U[r, t]``, so a row's tokens do not depend on which rows share its
step: any ``S`` gives the same completions as ``S = N`` (all rows at once, no refill).

The step's cost follows the live work, not the worst case:

- the KV buffers hold ``P + K`` columns, ``K`` the longest live row's length rounded up
  to ``KV_BUCKET`` (grown and trimmed at host checks), so attention reads what some live
  row needs rather than ``P + max_tokens`` columns for every slot;
- once the queue is empty, finished rows leave the batch: the slots shrink to the live
  rows, rounded up to a power of two (up to ``WIDTH_STEP``) or a multiple of ``WIDTH_STEP``;
- each slot writes its column in place (a scatter of one column per slot), and the
  slot's position, step index and uniforms live in the compiled step's state, so a step
  is one compiled call with no host arrays built per token.

Widths and capacities are bucketed, so the compiled step sees a few recurring shapes.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import NamedTuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from grpo.core.rollout import (
    CHECK_EVERY,
    KV_BUCKET,
    Sampler,
    _advance,
    _policy,
    _prefill,
    _round_up,
    _seen_tokens,
    compiled_per_model,
    end_flags,
    uniforms,
)
from grpo.core.sampling import SamplingConfig, make_uniform_sample_fn


class SlotKVCache(BatchKVCache):
    """A decode cache whose rows sit at different positions (one slot per row).

    ``keys``/``values`` ``[S, H, C, D]``; ``pos`` ``[S]`` is the column each slot writes
    this step (its RoPE position is ``pos - left_padding``); a slot attends to its columns
    ``left_padding <= c <= pos``. Columns a slot's previous row left behind are never read:
    the row writes column ``c`` before its mask first includes it.
    """

    def __init__(self, keys, values, left_padding, pos):
        self.keys, self.values = keys, values
        self.left_padding, self.pos = left_padding, pos
        self.offset = pos - left_padding
        self._idx = keys.shape[2]
        self._right_padding = None

    def update_and_fetch(self, keys, values):
        # A scatter of one column per slot: in place when the buffer is not shared.
        self.keys = _put_column(self.keys, self.pos, keys)
        self.values = _put_column(self.values, self.pos, values)
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        cols = mx.arange(self.keys.shape[2])[None, :]
        live = (cols <= self.pos[:, None]) & (cols >= self.left_padding[:, None])
        return live[:, None, None, :]


def _put_column(buffer, pos, column):
    S, H, _, D = column.shape
    at = mx.broadcast_to(pos.reshape(S, 1, 1, 1), (S, H, 1, D))
    return mx.put_along_axis(buffer, at, column, axis=2)


class SlotState(NamedTuple):
    """Arrays carried from one slot step to the next (``S`` slots, ``C`` KV columns)."""

    tokens: mx.array  # [S] int32, last sampled token (fed next)
    keys: list  # L x [S, H, C, D]: the prompt in columns [0, P), completion from P on
    values: list  # L x [S, H, C, D]
    left_padding: mx.array  # [S] int32
    pos: mx.array  # [S] int32, the column the next step writes (P + t - 1)
    t: mx.array  # [S] int32, the index of the token the next step draws
    u: mx.array  # [S, T] float32, the uniforms of the row in each slot
    seen: mx.array  # [S, V] bool (repetition penalty) or [1, 1] placeholder
    recent: mx.array  # [S, Sw] int32, last Sw sampled tokens (stop-sequence window)
    ended: mx.array  # [S] bool


WIDTH_STEP = 8  # slot counts above this are multiples of it
_STEPS: dict[int, dict] = {}  # id(model) -> {SamplingConfig: compiled slot step}
TRACES = [0]


def _compiled_step(model, sampling: SamplingConfig):
    return compiled_per_model(_STEPS, model, sampling, _make_step)


def _make_step(model_ref, sampling):
    sample = make_uniform_sample_fn(sampling)

    def step(params, state: SlotState):
        TRACES[0] += 1
        model = model_ref()
        model.update(params)
        cache = [
            SlotKVCache(k, v, state.left_padding, state.pos)
            for k, v in zip(state.keys, state.values, strict=True)
        ]
        logits = model(state.tokens[:, None], cache=cache)[:, -1, :]
        u = mx.take_along_axis(state.u, state.t[:, None], axis=1)[:, 0]
        tokens, logprobs = sample(logits, state.seen, u)
        state = _advance(state, tokens, sampling)
        # Free slots step too: clamping keeps their writes and draws inside the buffers.
        C, T = state.keys[0].shape[2], state.u.shape[1]
        return state._replace(
            keys=[c.keys for c in cache],
            values=[c.values for c in cache],
            pos=mx.minimum(state.pos + 1, C - 1),
            t=mx.minimum(state.t + 1, T - 1),
        ), logprobs

    return step


def _first_tokens(logits, prompts, sampling, U):
    # Token 0 of every row, from its prompt's prefill logits and its own U[r, 0].
    G = sampling.group_size
    rows = mx.repeat(mx.arange(len(prompts)), G)
    penalty = sampling.repetition_penalty != 1.0
    seen = _seen_tokens(prompts, G, logits.shape[-1]) if penalty else mx.zeros((1, 1), mx.bool_)
    tokens, lp = make_uniform_sample_fn(sampling)(logits[rows], seen, U[:, 0])
    ends = end_flags(
        tokens[:, None], eos_ids=sampling.eos_ids, stop_sequences=sampling.stop_sequences
    )[:, 0]
    if penalty:  # the first token is seen from the second step on, as in rollout
        seen = mx.put_along_axis(seen, tokens[:, None], mx.array(True), axis=-1)
    return tokens, lp, ends, seen


def _put_rows(x: mx.array, at: mx.array, rows: mx.array) -> mx.array:
    # x with x[at[i], :n1, :n2, ...] = rows[i] (rows may cover the leading part of an axis);
    # a new array object, so the caller's x is left as it was.
    y = mx.stop_gradient(x)
    y[(at,) + tuple(slice(0, n) for n in rows.shape[1:])] = rows
    return y


class _Queued(NamedTuple):
    """What a queued row brings into a slot, indexed by row ``r`` (or prompt ``b``)."""

    prefix_keys: list  # L x [B, H, P, D]
    prefix_values: list  # L x [B, H, P, D]
    left_padding: mx.array  # [B] int32
    tokens: mx.array  # [N] int32, each row's token 0
    u: mx.array  # [N, T] float32
    seen: mx.array  # [N, V] bool or [1, 1] placeholder


def _admit(state: SlotState, at: np.ndarray, rows: np.ndarray, prompt_of, q: _Queued, P: int):
    # Rows `rows` enter slots `at`: prompt columns, left padding, token 0, position, draws.
    at_, r_, b_ = mx.array(at), mx.array(rows), mx.array(prompt_of[rows])
    recent = mx.full((len(at), state.recent.shape[1]), -1, mx.int32)
    recent[:, -1] = q.tokens[r_]
    put = lambda x, v: _put_rows(x, at_, v)  # noqa: E731
    return state._replace(
        keys=[put(k, p[b_]) for k, p in zip(state.keys, q.prefix_keys, strict=True)],
        values=[put(v, p[b_]) for v, p in zip(state.values, q.prefix_values, strict=True)],
        tokens=put(state.tokens, q.tokens[r_]),
        left_padding=put(state.left_padding, q.left_padding[b_]),
        pos=put(state.pos, mx.full((len(at),), P, mx.int32)),
        t=put(state.t, mx.ones((len(at),), mx.int32)),
        u=put(state.u, q.u[r_]),
        seen=put(state.seen, q.seen[r_]) if state.seen.shape[-1] > 1 else state.seen,
        recent=put(state.recent, recent),
        ended=put(state.ended, mx.zeros((len(at),), mx.bool_)),
    )


def _keep_slots(state: SlotState, keep: np.ndarray) -> SlotState:
    # The slots `keep`, in order (finished rows leave the batch).
    idx = mx.array(keep)
    S = state.tokens.shape[0]
    take = lambda x: x[idx] if x.shape[0] == S else x  # noqa: E731  ([1, 1] placeholder stays)
    return SlotState(*[[take(a) for a in x] if isinstance(x, list) else take(x) for x in state])


def _fit_columns(state: SlotState, C: int) -> SlotState:
    # Grow or trim the KV buffers to C columns; a free slot's clamped column moves inside.
    have = state.keys[0].shape[2]
    if C == have:
        return state
    if C > have:
        pad = [(0, 0), (0, 0), (0, C - have), (0, 0)]
        fit = lambda x: mx.pad(x, pad)  # noqa: E731
    else:
        fit = lambda x: mx.contiguous(x[:, :, :C])  # noqa: E731
    return state._replace(
        keys=[fit(k) for k in state.keys],
        values=[fit(v) for v in state.values],
        pos=mx.minimum(state.pos, C - 1),
    )


class _Slots:
    """Host bookkeeping: which row each slot holds and at which step it is."""

    def __init__(self, S: int):
        self.row = np.full(S, -1)
        self.t = np.zeros(S, np.int64)

    def free(self) -> np.ndarray:
        return np.flatnonzero(self.row < 0)

    def busy(self) -> np.ndarray:
        return np.flatnonzero(self.row >= 0)

    def keep(self, keep: np.ndarray) -> None:
        self.row, self.t = self.row[keep], self.t[keep]


def _width(n: int) -> int:
    # Slot-count buckets: powers of two up to WIDTH_STEP, then multiples of it, so at most
    # WIDTH_STEP - 1 slots idle once the batch is wide, with few distinct compiled shapes.
    if n <= WIDTH_STEP:
        return 1 << max(n - 1, 0).bit_length()
    return _round_up(n, WIDTH_STEP)


def _schedule(state, book, queue, prompt_of, q, P):
    # Refill free slots from the queue; with the queue empty, shrink to the live rows.
    free = book.free()
    if queue and len(free):
        rows = np.array([queue.popleft() for _ in range(min(len(free), len(queue)))])
        at = free[: len(rows)]
        state = _admit(state, at, rows, prompt_of, q, P)
        book.row[at], book.t[at] = rows, 1
        return state
    busy = book.busy()
    width = _width(len(busy))
    if not queue and width < len(book.row):
        keep = np.concatenate([busy, free[: width - len(busy)]])
        state = _keep_slots(state, keep)
        book.keep(keep)
    return state


def decode_continuous(
    model, prompts, lengths, key, sampling: SamplingConfig, *, slots: int, eos_at=None
):
    """Token ids and log-probs ``[N, T]`` of all ``N = B * G`` rows through ``slots`` slots.

    ``eos_at`` (``[N]`` ints in ``[1, T]``, or ``None``) makes row ``r`` end with
    ``sampling.eos_ids[0]`` as its token ``eos_at[r] - 1`` unless it ends earlier; with no
    ``eos_ids`` the row just stops after ``eos_at[r]`` tokens (zeros after).
    """
    G, T = sampling.group_size, sampling.max_tokens
    N = len(prompts) * G
    limit = np.full(N, T) if eos_at is None else np.minimum(np.asarray(eos_at), T)
    force = np.zeros(N, bool) if eos_at is None else np.asarray(eos_at) <= T
    force &= bool(sampling.eos_ids)
    q, P, out, end0 = _start(model, prompts, lengths, key, sampling)
    forced = (limit == 1) & force & ~end0
    if forced.any():
        out[0][forced, 0] = sampling.eos_ids[0]
    # Rows that end at token 0 (or may have one token only) never take a slot.
    queue = deque(r for r in range(N) if not end0[r] and limit[r] > 1)
    book = _Slots(max(1, min(slots, len(queue))))
    state = _empty_state(len(book.row), q, P + KV_BUCKET, sampling)
    step, params = _compiled_step(model, sampling), model.parameters()
    checks = bool(sampling.eos_ids or sampling.stop_sequences)
    while queue or len(book.busy()):
        state = _schedule(state, book, queue, np.repeat(np.arange(len(prompts)), G), q, P)
        busy = book.busy()
        # Run until the next check, or until the busy slot nearest its limit gets there.
        n = min(CHECK_EVERY if checks else T, int((limit[book.row[busy]] - book.t[busy]).min()))
        # Columns up to P + t + n - 2 get written in this run.
        K = min(_round_up(int(book.t[busy].max()) + n - 1, KV_BUCKET), _round_up(T, KV_BUCKET))
        state = _run(step, params, _fit_columns(state, P + K), book, n, out)
        _retire(book, state, limit, force, out[0], sampling, checks)
    return mx.array(out[0]), mx.array(out[1])


def _start(model, prompts, lengths, key, sampling):
    # Prefill every prompt once, draw every row's token 0; the host arrays the rows fill.
    G, T = sampling.group_size, sampling.max_tokens
    N = len(prompts) * G
    cache, logits = _prefill(model, prompts, lengths)
    P = cache[0].size()
    U = uniforms(key, N, T)
    tok0, lp0, end0, seen0 = _first_tokens(logits, prompts, sampling, U)
    q = _Queued(
        prefix_keys=[c.keys[..., :P, :] for c in cache],
        prefix_values=[c.values[..., :P, :] for c in cache],
        left_padding=cache[0].left_padding.astype(mx.int32),
        tokens=tok0,
        u=U,
        seen=seen0,
    )
    mx.eval(q, lp0, end0)
    out = (np.zeros((N, T), np.int32), np.zeros((N, T), np.float32))
    out[0][:, 0], out[1][:, 0] = np.array(tok0), np.array(lp0)
    return q, P, out, np.array(end0)


def _run(step, params, state, book, n, out):
    # n steps of every slot; the busy slots' tokens and log-probs go to their rows.
    toks, lps = [], []
    for _ in range(n):
        state, lp = step(params, state)
        # A blocking eval with no other reference to last step's buffers lets the
        # column scatter write in place (async_eval would copy every buffer).
        mx.eval(state, lp)
        toks.append(state.tokens)
        lps.append(lp)
    busy = book.busy()
    rows, cols = book.row[busy, None], book.t[busy, None] + np.arange(n)[None, :]
    out[0][rows, cols] = np.array(mx.stack(toks, 1))[busy]
    out[1][rows, cols] = np.array(mx.stack(lps, 1))[busy]
    book.t[busy] += n
    return state


def _retire(book, state, limit, force, out_tok, sampling, checks):
    # Free the slots whose rows ended (end token, stop sequence or their limit).
    ended = np.array(state.ended) if checks else np.zeros(len(book.row), bool)
    row = np.maximum(book.row, 0)
    at_limit = (book.row >= 0) & (book.t >= limit[row])
    # A row that reached its pre-drawn end without EOS gets EOS there.
    cut = at_limit & ~ended & force[row]
    if cut.any():
        out_tok[book.row[cut], book.t[cut] - 1] = sampling.eos_ids[0]
    book.row[(book.row >= 0) & (ended | at_limit)] = -1


def _empty_state(S: int, q: _Queued, C: int, sampling: SamplingConfig) -> SlotState:
    def zeros(x):  # keys and values may differ in head size (latent attention)
        return mx.zeros((S, x.shape[1], C, x.shape[3]), x.dtype)

    Sw = max([len(s) for s in sampling.stop_sequences] + [1])
    seen = q.seen
    return SlotState(
        tokens=mx.zeros((S,), mx.int32),
        keys=[zeros(k) for k in q.prefix_keys],
        values=[zeros(v) for v in q.prefix_values],
        left_padding=mx.zeros((S,), mx.int32),
        pos=mx.full((S,), C - 1, mx.int32),
        t=mx.zeros((S,), mx.int32),
        u=mx.ones((S, q.u.shape[1]), mx.float32),
        seen=mx.zeros((S, seen.shape[1]), mx.bool_) if seen.shape[-1] > 1 else seen,
        recent=mx.full((S, Sw), -1, mx.int32),
        ended=mx.ones((S,), mx.bool_),
    )


def rollout_continuous(
    params, key, prompts, *, model, sampling: SamplingConfig, slots: int, eos_at=None
):
    """:func:`grpo.core.rollout.rollout` through ``slots`` continuously refilled decode slots.

    Same contract and :class:`grpo.core.rollout.Rollout` as ``rollout``; needs a model
    that :func:`grpo.core.rollout.batches_rows`. For a given ``key`` every ``slots`` gives
    the same completions as ``rollout`` (each row draws with its own uniforms,
    :func:`grpo.core.rollout.uniforms`), up to float rounding of batched matmuls.
    ``eos_at`` (``[B * G]`` ints, benchmarks) makes row ``r`` emit EOS as its token
    ``eos_at[r] - 1``.
    """
    from grpo.core.rollout import _assemble, _check_prompts, batches_rows

    lengths = _check_prompts(prompts, model)
    if not batches_rows(model):
        raise ValueError(
            f"rollout_continuous: {type(model).__module__} does not take the batched decode "
            "(grpo.core.rollout.batches_rows); use rollout"
        )
    if slots < 1:
        raise ValueError(f"rollout_continuous: slots must be >= 1, got slots={slots!r}")
    if eos_at is not None and not sampling.eos_ids:
        raise ValueError("rollout_continuous: eos_at needs sampling.eos_ids")
    with _policy(model, params):
        tokens, logprobs = decode_continuous(
            model, prompts, lengths, key, sampling, slots=slots, eos_at=eos_at
        )
    return _assemble(prompts, lengths, tokens, logprobs, sampling)


def continuous_sampler(model, rows: int, *, slots: int | None) -> Sampler | None:
    """:func:`rollout_continuous` through ``slots`` slots, for a generation batch of ``rows``
    completions that exceeds them; ``None`` when :func:`grpo.core.rollout.rollout` serves
    (``slots`` is ``None`` or at least ``rows``, or the model is decoded prompt by prompt,
    which holds only ``G`` rows at a time). Both give the same completions for the same key.
    """
    from grpo.core.rollout import batches_rows

    if slots is None or rows <= slots or not batches_rows(model):
        return None
    return functools.partial(rollout_continuous, slots=slots)
