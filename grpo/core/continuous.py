"""Continuous batching for the rollout: a fixed number of decode slots, refilled as rows end.

.. math:: y_{r,t} = \\operatorname{draw}\\big(\\pi(\\cdot \\mid x_{b(r)}, y_{r,<t}),\\ U_{r,t}\\big),
          \\quad U \\sim \\mathcal{U}(0, 1]^{N \\times T}

Every prompt is prefilled once (its ``G`` rows share that prefill, as in
:func:`grpo.core.rollout.rollout`); rows then enter ``S`` decode slots in order, each
slot with its own KV columns, RoPE position and write column, and a row that ends (EOS,
stop sequence or ``max_tokens``) frees its slot for the next row at the next host check,
so the decode batch stays ``S`` wide until the queue is empty. Each row's draws use
its own uniforms ``U[r, t]``, so a row's tokens do not depend on which rows share its
step: any ``S`` gives the same completions as ``S = N`` (all rows at once, no refill).
"""

from __future__ import annotations

from collections import deque

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from grpo.core.rollout import (
    CHECK_EVERY,
    KV_BUCKET,
    DecodeState,
    _advance,
    _policy,
    _prefill,
    _round_up,
    _seen_tokens,
    compiled_per_model,
    end_flags,
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
        S, H, _, D = keys.shape
        at = mx.broadcast_to(self.pos.reshape(S, 1, 1, 1), (S, H, 1, D))
        self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
        at = mx.broadcast_to(self.pos.reshape(S, 1, 1, 1), (S, values.shape[1], 1, values.shape[3]))
        self.values = mx.put_along_axis(self.values, at, values, axis=2)
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        cols = mx.arange(self.keys.shape[2])[None, :]
        live = (cols <= self.pos[:, None]) & (cols >= self.left_padding[:, None])
        return live[:, None, None, :]


_STEPS: dict[int, dict] = {}  # id(model) -> {SamplingConfig: compiled slot step}
TRACES = [0]


def _compiled_step(model, sampling: SamplingConfig):
    return compiled_per_model(_STEPS, model, sampling, _make_step)


def _make_step(model_ref, sampling):
    sample = make_uniform_sample_fn(sampling)

    def step(params, state: DecodeState, pos, u):
        TRACES[0] += 1
        model = model_ref()
        model.update(params)
        cache = [
            SlotKVCache(k, v, state.left_padding, pos)
            for k, v in zip(state.keys, state.values, strict=True)
        ]
        logits = model(state.tokens[:, None], cache=cache)[:, -1, :]
        tokens, logprobs = sample(logits, state.seen, u)
        state = _advance(state, tokens, sampling)
        return state._replace(keys=[c.keys for c in cache], values=[c.values for c in cache]), (
            logprobs
        )

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


class _Slots:
    """Host bookkeeping: which row each slot holds and at which step it is."""

    def __init__(self, S: int):
        self.row = np.full(S, -1)
        self.t = np.zeros(S, np.int64)

    def free(self) -> np.ndarray:
        return np.flatnonzero(self.row < 0)

    def busy(self) -> np.ndarray:
        return np.flatnonzero(self.row >= 0)


def _admit(state, slots, queue, rows_of, prefix, first, P):
    # Move queued rows into free slots: prompt columns, left padding, first token, state.
    keys, values = list(state.keys), list(state.values)
    prefix_k, prefix_v, left = prefix
    tok0, seen0 = first
    tokens, lp_left, seen, recent, ended = (
        state.tokens, state.left_padding, state.seen, state.recent, state.ended,
    )  # fmt: skip
    for s in slots.free().tolist():
        if not queue:
            break
        r = queue.popleft()
        b = int(rows_of[r])
        at = mx.array([s], mx.int32)
        for i in range(len(keys)):
            keys[i] = mx.slice_update(
                keys[i], prefix_k[i][b : b + 1], mx.array([s, 0, 0, 0]), (0, 1, 2, 3)
            )
            values[i] = mx.slice_update(
                values[i], prefix_v[i][b : b + 1], mx.array([s, 0, 0, 0]), (0, 1, 2, 3)
            )
        tokens = mx.slice_update(tokens, tok0[r : r + 1], at, (0,))
        lp_left = mx.slice_update(lp_left, left[b : b + 1], at, (0,))
        if seen.shape[-1] > 1:  # [1, 1] is the no-penalty placeholder
            seen = mx.slice_update(seen, seen0[r : r + 1], mx.array([s, 0]), (0, 1))
        first_recent = mx.full((1, recent.shape[1]), -1, mx.int32)
        first_recent[:, -1] = tok0[r]
        recent = mx.slice_update(recent, first_recent, mx.array([s, 0]), (0, 1))
        ended = mx.slice_update(ended, mx.zeros((1,), mx.bool_), at, (0,))
        slots.row[s], slots.t[s] = r, 1
    return state._replace(
        keys=keys, values=values, tokens=tokens, left_padding=lp_left, seen=seen,
        recent=recent, ended=ended,
    )  # fmt: skip


def decode_continuous(
    model, prompts, lengths, key, sampling: SamplingConfig, *, slots: int, eos_at=None
):
    """Token ids and log-probs ``[N, T]`` of all ``N = B * G`` rows through ``slots`` slots.

    ``eos_at`` (``[N]`` ints in ``[1, T]``, or ``None``) makes row ``r`` end with
    ``sampling.eos_ids[0]`` as its token ``eos_at[r] - 1`` unless it ends earlier; with no
    ``eos_ids`` the row just stops after ``eos_at[r]`` tokens (zeros after).
    """
    G, T = sampling.group_size, sampling.max_tokens
    B = len(prompts)
    N = B * G
    limit = np.full(N, T) if eos_at is None else np.minimum(np.asarray(eos_at), T)
    force = np.zeros(N, bool) if eos_at is None else np.asarray(eos_at) <= T
    force &= bool(sampling.eos_ids)
    cache, logits = _prefill(model, prompts, lengths)
    P = cache[0].size()
    prefix = (
        [c.keys[..., :P, :] for c in cache],
        [c.values[..., :P, :] for c in cache],
        cache[0].left_padding.astype(mx.int32),
    )
    U = 1.0 - mx.random.uniform(shape=(N, T), key=key)
    tok0, lp0, end0, seen0 = _first_tokens(logits, prompts, sampling, U)
    mx.eval(tok0, lp0, end0, prefix)
    out_tok = np.zeros((N, T), np.int32)
    out_lp = np.zeros((N, T), np.float32)
    out_tok[:, 0], out_lp[:, 0] = np.array(tok0), np.array(lp0)
    end0 = np.array(end0)
    forced = (limit == 1) & force & ~end0
    if forced.any():
        out_tok[forced, 0] = sampling.eos_ids[0]
    rows_of = np.repeat(np.arange(B), G)
    # Rows that end at token 0 (or may have one token only) never take a slot.
    queue = deque(r for r in range(N) if not end0[r] and limit[r] > 1)
    S = max(1, min(slots, len(queue)))
    C = P + _round_up(T, KV_BUCKET)
    Sw = max([len(s) for s in sampling.stop_sequences] + [1])

    def zeros(x):
        return mx.zeros((S, x.shape[1], C, x.shape[3]), x.dtype)

    state = DecodeState(
        tokens=mx.zeros((S,), mx.int32),
        keys=[zeros(k) for k in prefix[0]],
        values=[zeros(v) for v in prefix[1]],
        prefix_keys=[],
        prefix_values=[],
        left_padding=mx.zeros((S,), mx.int32),
        seen=mx.zeros((S, seen0.shape[1]), mx.bool_) if seen0.shape[-1] > 1 else seen0,
        recent=mx.full((S, Sw), -1, mx.int32),
        ended=mx.ones((S,), mx.bool_),
    )
    book = _Slots(S)
    step = _compiled_step(model, sampling)
    params = model.parameters()
    checks = bool(sampling.eos_ids or sampling.stop_sequences)
    while queue or len(book.busy()):
        state = _admit(state, book, queue, rows_of, prefix, (tok0, seen0), P)
        busy = book.busy()
        # Run until the next check, or until the busy slot nearest its limit gets there.
        n = min(CHECK_EVERY if checks else T, int((limit[book.row[busy]] - book.t[busy]).min()))
        record = []
        for _ in range(n):
            rows = np.where(book.row >= 0, book.row, 0)
            t = np.minimum(book.t, T - 1)
            pos = mx.array(P + t - 1, dtype=mx.int32)
            u = U[mx.array(rows), mx.array(t)]
            state, lp = step(params, state, pos, u)
            mx.eval(state, lp)
            record.append((book.row.copy(), book.t.copy(), state.tokens, lp))
            book.t += book.row >= 0
        for rows, t, tok, lp in record:
            live = rows >= 0
            out_tok[rows[live], t[live]] = np.array(tok)[live]
            out_lp[rows[live], t[live]] = np.array(lp)[live]
        ended = np.array(state.ended) if checks else np.zeros(S, bool)
        at_limit = (book.row >= 0) & (book.t >= limit[np.maximum(book.row, 0)])
        if eos_at is not None:
            # A row that reached its pre-drawn end without EOS gets EOS there.
            cut = at_limit & ~ended & force[np.maximum(book.row, 0)]
            if cut.any():
                out_tok[book.row[cut], book.t[cut] - 1] = sampling.eos_ids[0]
        done = (book.row >= 0) & (ended | at_limit)
        book.row[done] = -1
    return mx.array(out_tok), mx.array(out_lp)


def rollout_continuous(
    params, key, prompts, *, model, sampling: SamplingConfig, slots: int, eos_at=None
):
    """:func:`grpo.core.rollout.rollout` through ``slots`` continuously refilled decode slots.

    Same contract and :class:`grpo.core.rollout.Rollout` as ``rollout``; needs a model
    that :func:`grpo.core.rollout.batches_rows`. For a given ``key`` every ``slots`` gives
    the same completions (each row draws with its own uniforms), but not the same as
    ``rollout``, whose draws are keyed per step over the whole batch. ``eos_at``
    (``[B * G]`` ints, benchmarks) makes row ``r`` emit EOS as its token ``eos_at[r] - 1``.
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
