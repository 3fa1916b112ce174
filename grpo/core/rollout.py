"""Group rollout: sample ``G`` completions for each of ``B`` prompts with real token ids.

``rollout(params, key, prompts, *, model, sampling)`` prefills every distinct prompt
once into mlx-lm ``BatchKVCache`` objects (left-padded, so ragged prompts get correct
masks and RoPE positions), shares each prompt's keys/values with its ``G`` rows (stored
once per group when the model's attention reads ``SharedPrefixKVCache``, otherwise
gathered into every row), and decodes all ``N = B * G`` rows together. One decode step (model call on a fixed-shape
``BatchKVCache`` subclass + sampling) is ``mx.compile``d per (model, config); shapes are
bucketed (prompt length, KV capacity, live-row count) so it does not retrace after
warm-up. The token loop is Python, as in ``mlx_lm.generate``; every
``CHECK_EVERY`` steps the host reads which rows ended, stops when all have, and drops
finished rows once at most ``FILTER_FRACTION`` are live. docs/sampler.md has the details.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from typing import NamedTuple, Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.cache import BatchKVCache, CacheList, KVCache, make_prompt_cache

from grpo.core.kv_cache import FixedBatchKVCache, SharedPrefixKVCache
from grpo.core.sampling import SamplingConfig, make_uniform_sample_fn

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this
PREFILL_CHUNK = 512  # prompt tokens per prefill call
KV_BUCKET = 32  # the KV buffer grows by this many columns at a time
CHECK_EVERY = 8  # decode steps between host checks for finished rows
FILTER_FRACTION = 0.5  # compact the batch once at most this fraction of rows is live


class Rollout(NamedTuple):
    """``N = B * G`` sampled completions, group-contiguous (rows ``b*G .. b*G+G-1``).

    Attributes:
        prompt_ids: ``[N, P]`` int32, right-padded with 0.
        prompt_lengths: ``[N]`` int32.
        completion_ids: ``[N, T]`` int32, the exact sampled ids, 0 after the end.
        logprobs: ``[N, T]`` float32, log-prob of each sampled token under the sampling
            distribution (after penalty, temperature and filters), 0 after the end.
        completion_mask: ``[N, T]`` float32, 1 up to and including EOS / stop sequence.
        is_truncated: ``[N]`` bool, hit ``max_tokens`` without EOS or stop sequence.
        completion_lengths: ``[N]`` int32, ``completion_mask.sum(-1)``.
    """

    prompt_ids: mx.array
    prompt_lengths: mx.array
    completion_ids: mx.array
    logprobs: mx.array
    completion_mask: mx.array
    is_truncated: mx.array
    completion_lengths: mx.array


class Sampler(Protocol):
    """Anything that turns ``B`` prompts into a ``Rollout`` of ``B * G`` rows.

    ``rollout`` is the built-in one; another engine (a server, a speculative decoder)
    can stand in behind the same signature. See docs/sampler.md for the contract.
    """

    def __call__(
        self,
        params: dict,
        key: mx.array,
        prompts: list[list[int]],
        *,
        model: nn.Module,
        sampling: SamplingConfig,
    ) -> Rollout: ...


def end_flags(tokens: mx.array, *, eos_ids=(), stop_sequences=()) -> mx.array:
    """``[N, T]`` bool: token ``t`` is an EOS id or ends a stop sequence at ``t``.

    Args:
        tokens: ``[N, T]`` sampled completion ids.
        eos_ids: EOS token ids.
        stop_sequences: Token-id tuples, matched inside the completion only.
    """
    N, T = tokens.shape
    ends = mx.zeros((N, T), dtype=mx.bool_)
    for e in eos_ids:
        ends = ends | (tokens == e)
    for seq in stop_sequences:
        L = len(seq)
        if L > T:
            continue
        hit = mx.ones((N, T - L + 1), dtype=mx.bool_)
        for j, tok in enumerate(seq):
            hit = hit & (tokens[:, j : T - L + 1 + j] == tok)
        ends = ends | mx.pad(hit, [(0, 0), (L - 1, 0)])
    return ends


def completion_mask(ends: mx.array) -> mx.array:
    """``[N, T]`` float32 mask, 1 up to and including the first end flag in each row."""
    ends = ends.astype(mx.int32)
    before = mx.cumsum(ends, axis=-1) - ends
    return (before == 0).astype(mx.float32)


def rollout(
    params: dict,
    key: mx.array,
    prompts: list[list[int]],
    *,
    model: nn.Module,
    sampling: SamplingConfig,
) -> Rollout:
    """Sample ``G = sampling.group_size`` completions for each prompt.

    .. math:: y_{i,t} \\sim \\pi_\\theta^{\\text{sample}}(\\cdot \\mid x_b, y_{i,<t}),
        \\quad i = bG, \\dots, bG + G - 1

    Args:
        params: Model parameters (a full or partial ``model.parameters()`` tree); the
            model is restored to its own parameters and train/eval mode afterwards.
        key: RNG key; same key, params and prompts give the same ``Rollout``.
        prompts: ``B`` lists of token ids (ragged lengths, each non-empty).
        model: An mlx-lm model (any cache :func:`mlx_lm.models.cache.make_prompt_cache`
            builds; see :func:`plain_kv_cache`).
        sampling: Sampling knobs; ``T <= sampling.max_tokens``.

    Returns:
        ``Rollout`` with ``N = B * G`` rows; ``T`` is the longest completion.
    """
    lengths = _check_prompts(prompts, model)
    with _policy(model, params):
        if batches_rows(model):
            cache, logits = _prefill(model, prompts, lengths)
            tokens, logprobs = _decode(model, cache, logits, key, prompts, sampling)
        else:
            tokens, logprobs = _rollout_per_prompt(model, prompts, key, sampling)
    return _assemble(prompts, lengths, tokens, logprobs, sampling)


def batches_rows(model) -> bool:
    """True when ``model`` takes the batched, compiled decode over all ``B * G`` rows.

    That needs one plain ``KVCache`` per layer and attention through mlx-lm's
    ``scaled_dot_product_attention`` (which takes per-row padding masks; an architecture
    that forms its own scores, such as Gemma 2's soft-capped attention, cannot broadcast
    them). Any other model (sliding-window ``RotatingKVCache``, ``ArraysCache`` recurrent /
    SSM state, ``CacheList``, mixed lists) is decoded prompt by prompt with mlx-lm's own
    caches (:func:`_rollout_per_prompt`): slower, exact for every cache type.
    """
    module = sys.modules.get(type(model).__module__)
    if not hasattr(module, "scaled_dot_product_attention"):
        return False
    return all(type(c) is KVCache for c in make_prompt_cache(model))


def fork_cache(cache, G: int) -> None:
    """Repeat every row of each layer's cache ``G`` times in place (``[1, ...] -> [G, ...]``).

    Works on any mlx-lm cache whose ``state`` holds batch-first arrays (KV, rotating,
    quantized, arrays/recurrent state) and on ``CacheList`` by recursion.
    """
    for c in cache:
        if isinstance(c, CacheList):
            fork_cache(c.caches, G)
            continue
        c.state = tree_map(
            lambda x: mx.repeat(x, G, axis=0) if isinstance(x, mx.array) else x, c.state
        )


def _rollout_per_prompt(model, prompts, key, sampling):
    # One prompt at a time: prefill once (no padding, so no cache type needs masks), fork the
    # cache into G rows, decode with the model's own cache updates (as mlx_lm.generate).
    G, T = sampling.group_size, sampling.max_tokens
    first = _compiled_first(sampling)
    toks, lps = [], []
    U = uniforms(key, len(prompts) * G, T)
    for b, prompt in enumerate(prompts):
        cache = make_prompt_cache(model)
        ids = mx.array(prompt, dtype=mx.int32)[None]
        n = len(prompt)
        for start in range(0, n - 1, PREFILL_CHUNK):
            model(ids[:, start : min(start + PREFILL_CHUNK, n - 1)], cache=cache)
            mx.eval([c.state for c in cache])
        logits = model(ids[:, n - 1 :], cache=cache)[:, -1, :]
        fork_cache(cache, G)
        state = _row_state([prompt], sampling, logits.shape[-1])
        u = U[b * G : (b + 1) * G]
        rows_t, rows_lp = [], []
        for t in range(T):
            if t:
                logits = model(state.tokens[:, None], cache=cache)[:, -1, :]
            state, lp = first(mx.broadcast_to(logits, (G, logits.shape[-1])), state, u[:, t])
            rows_t.append(state.tokens)
            rows_lp.append(lp)
            mx.eval(state, lp, [c.state for c in cache])
            if t % CHECK_EVERY == 0 and (sampling.eos_ids or sampling.stop_sequences):
                if bool(np.array(state.ended).all()):
                    break
        toks.append(mx.stack(rows_t, 1))
        lps.append(mx.stack(rows_lp, 1))
    steps = max(x.shape[1] for x in toks)
    pad = lambda x: mx.pad(x, [(0, 0), (0, steps - x.shape[1])])  # noqa: E731
    return mx.concatenate([pad(x) for x in toks]), mx.concatenate([pad(x) for x in lps])


def uniforms(key: mx.array, N: int, T: int) -> mx.array:
    """``U [N, T]`` in ``(0, 1]``: row ``r`` draws its token ``t`` with ``U[r, t]``.

    Every decode path keys a row's draws by row and step this way, so a row's tokens do
    not depend on which rows share its batch: compaction, continuous batching
    (:mod:`grpo.core.continuous`) and per-prompt decoding give the same completions.
    """
    return 1.0 - mx.random.uniform(shape=(N, T), key=key)


def _row_state(prompts, sampling, V) -> DecodeState:
    # The sampling state alone (no KV arrays): the per-prompt path keeps mlx-lm's caches.
    G = sampling.group_size
    N = len(prompts) * G
    S = max([len(s) for s in sampling.stop_sequences] + [1])
    penalty = sampling.repetition_penalty != 1.0
    return DecodeState(
        tokens=mx.zeros((N,), mx.int32),
        keys=[],
        values=[],
        prefix_keys=[],
        prefix_values=[],
        left_padding=mx.zeros((N,), mx.int32),
        seen=_seen_tokens(prompts, G, V) if penalty else mx.zeros((1, 1), mx.bool_),
        recent=mx.full((N, S), -1, mx.int32),
        ended=mx.zeros((N,), mx.bool_),
    )


def _check_prompts(prompts, model) -> list[int]:
    if not isinstance(prompts, list | tuple) or len(prompts) == 0:
        raise ValueError(
            f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}"
        )
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompts must all be non-empty, got lengths {lengths}")
    vocab = vocab_size(model)
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < (vocab or 2**31)]
        if bad:
            raise ValueError(f"prompts[{i}] holds token ids outside [0, {vocab}): {bad[:5]}")
    return lengths


def vocab_size(model) -> int | None:
    """The model's vocabulary from its args (top level or a nested ``text_config``)."""
    args = getattr(model, "args", None)
    for where in (args, getattr(args, "text_config", None)):
        v = (
            where.get("vocab_size")
            if isinstance(where, dict)
            else getattr(where, "vocab_size", None)
        )
        if isinstance(v, int):
            return v
    return None


@contextlib.contextmanager
def _policy(model, params):
    # Sampling uses `params` in eval mode (no dropout); the caller's model is left as it was.
    was_training, before = model.training, model.parameters()
    model.eval()
    model.update(params)
    try:
        yield
    finally:
        model.update(before)
        model.train(was_training)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _prefill(model, prompts, lengths):
    P = _round_up(max(lengths), PROMPT_BUCKET)
    left = [P - n for n in lengths]
    ids = mx.array(
        [[0] * pad + list(p) for pad, p in zip(left, prompts, strict=True)], dtype=mx.int32
    )
    cache = []
    for _ in make_prompt_cache(model):
        cache.append(BatchKVCache(left))
    # Chunks bound activation memory; only the cache is evaluated, so the lm_head never
    # runs on prompt positions (lazy graph), and the last token alone yields logits.
    for start in range(0, P - 1, PREFILL_CHUNK):
        model(ids[:, start : min(start + PREFILL_CHUNK, P - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(ids[:, P - 1 :], cache=cache)[:, -1, :]
    return cache, logits


def shares_prefix(model) -> bool:
    """True when ``model``'s attention reads :class:`SharedPrefixKVCache` prefixes."""
    fn = getattr(sys.modules.get(type(model).__module__), "scaled_dot_product_attention", None)
    return bool(getattr(fn, "grpo_prefix_caches", False))


_STEPS: dict[int, dict] = {}  # id(model) -> {SamplingConfig: compiled step}
TRACES = [0]  # decode-step traces so far (a test asserts no retrace after warm-up)


class DecodeState(NamedTuple):
    """Arrays carried from one decode step to the next (``n`` live rows, ``C`` columns)."""

    tokens: mx.array  # [n] int32, last sampled token (fed next)
    keys: list  # L x [n, H, C, D]; with a shared prefix, completion columns only
    values: list  # L x [n, H, C, D]
    prefix_keys: list  # L x [B, H, P, D] shared prompt keys, or [] (prompt columns in keys)
    prefix_values: list  # L x [B, H, P, D], or []
    left_padding: mx.array  # [n] int32
    seen: mx.array  # [n, V] bool (repetition penalty) or [1, 1] placeholder
    recent: mx.array  # [n, S] int32, last S sampled tokens (stop-sequence window)
    ended: mx.array  # [n] bool


def compiled_per_model(steps: dict, model, sampling: SamplingConfig, make):
    """``mx.compile(make(weakref(model), sampling))``, cached in ``steps`` per model (dropped
    with the model) and per sampling config."""
    per_model = steps.get(id(model))
    if per_model is None:
        per_model = steps[id(model)] = {}
        weakref.finalize(model, steps.pop, id(model), None)
    if sampling not in per_model:
        per_model[sampling] = mx.compile(make(weakref.ref(model), sampling))
    return per_model[sampling]


def _compiled_step(model, sampling: SamplingConfig):
    return compiled_per_model(_STEPS, model, sampling, _make_step)


def _make_step(model_ref, sampling):
    sample = make_uniform_sample_fn(sampling)

    def step(params, state: DecodeState, pos, u):
        TRACES[0] += 1
        model = model_ref()
        model.update(params)
        if state.prefix_keys:
            cache = [
                SharedPrefixKVCache(pk, pv, k, v, state.left_padding, pos)
                for pk, pv, k, v in zip(
                    state.prefix_keys, state.prefix_values, state.keys, state.values, strict=True
                )
            ]
        else:
            cache = [
                FixedBatchKVCache(k, v, state.left_padding, pos)
                for k, v in zip(state.keys, state.values, strict=True)
            ]
        logits = model(state.tokens[:, None], cache=cache)[:, -1, :]
        tokens, logprobs = sample(logits, state.seen, u)
        state = _advance(state, tokens, sampling)
        keys, values = [c.keys for c in cache], [c.values for c in cache]
        return state._replace(keys=keys, values=values), logprobs

    return step


def _advance(state: DecodeState, tokens: mx.array, sampling: SamplingConfig) -> DecodeState:
    seen = state.seen
    if sampling.repetition_penalty != 1.0:
        seen = mx.put_along_axis(seen, tokens[:, None], mx.array(True), axis=-1)
    recent = mx.concatenate([state.recent[:, 1:], tokens[:, None]], axis=1)
    ends = end_flags(recent, eos_ids=sampling.eos_ids, stop_sequences=sampling.stop_sequences)[
        :, -1
    ]
    return state._replace(tokens=tokens, seen=seen, recent=recent, ended=state.ended | ends)


@functools.lru_cache(maxsize=32)
def _compiled_first(sampling: SamplingConfig):
    sample = make_uniform_sample_fn(sampling)

    def first(logits, state: DecodeState, u):
        tokens, logprobs = sample(logits, state.seen, u)
        return _advance(state, tokens, sampling), logprobs

    return mx.compile(first)


def _seen_tokens(prompts, G, V):
    seen = np.zeros((len(prompts), V), dtype=bool)
    for b, p in enumerate(prompts):
        seen[b, np.asarray(p, dtype=np.int64)] = True
    return mx.array(np.repeat(seen, G, axis=0))


def _initial_state(cache, prompts, sampling, V, *, shared: bool) -> DecodeState:
    # Prefix sharing: prompt b's prefilled keys/values serve its G rows, either kept once
    # (shared, read by the prefix-aware attention) or gathered into each row.
    G = sampling.group_size
    rows = mx.repeat(mx.arange(len(prompts)), G)
    P = cache[0].size()
    S = max([len(s) for s in sampling.stop_sequences] + [1])
    penalty = sampling.repetition_penalty != 1.0
    prefix_k = [c.keys[..., :P, :] for c in cache]
    prefix_v = [c.values[..., :P, :] for c in cache]
    if shared:

        def empty(x):  # keys and values may differ in head size (latent attention)
            return mx.zeros((len(rows), x.shape[1], 0, x.shape[3]), x.dtype)

        keys, values = [empty(k) for k in prefix_k], [empty(v) for v in prefix_v]
    else:
        keys, values = [k[rows] for k in prefix_k], [v[rows] for v in prefix_v]
        prefix_k, prefix_v = [], []
    return DecodeState(
        tokens=mx.zeros((len(rows),), mx.int32),
        keys=keys,
        values=values,
        prefix_keys=prefix_k,
        prefix_values=prefix_v,
        left_padding=cache[0].left_padding[rows].astype(mx.int32),
        seen=_seen_tokens(prompts, G, V) if penalty else mx.zeros((1, 1), mx.bool_),
        recent=mx.full((len(rows), S), -1, mx.int32),
        ended=mx.zeros((len(rows),), mx.bool_),
    )


def _grow(state: DecodeState, pos: int) -> DecodeState:
    # Capacity grows in KV_BUCKET columns so attention cost follows the length and the
    # compiled step sees a few recurring shapes (P and the bucket are both bucketed).
    P = state.prefix_keys[0].shape[2] if state.prefix_keys else 0
    C = state.keys[0].shape[2]
    if pos - P < C:
        return state
    pad = [(0, 0), (0, 0), (0, KV_BUCKET), (0, 0)]
    return state._replace(
        keys=[mx.pad(k, pad) for k in state.keys], values=[mx.pad(v, pad) for v in state.values]
    )


def _compact(state: DecodeState, rows: np.ndarray, ended: np.ndarray):
    # Drop finished rows once at most FILTER_FRACTION are live; keep a power-of-two row
    # count (padded with finished rows, marked -1) so compiled shapes recur.
    live = np.flatnonzero(~ended & (rows >= 0))
    n = len(rows)
    if len(live) == 0 or len(live) > FILTER_FRACTION * n:
        return state, rows
    size = 1 << int(np.ceil(np.log2(len(live))))
    if size >= n:
        return state, rows
    state = _unshare(state)
    dead = np.flatnonzero(ended | (rows < 0))[: size - len(live)]
    keep = np.concatenate([live, dead])
    new_rows = np.concatenate([rows[live], np.full(len(dead), -1)])
    idx = mx.array(keep)
    take = lambda x: x[idx] if x.shape[0] == n else x  # noqa: E731  ([1, 1] placeholder stays)
    state = DecodeState(*[[take(a) for a in x] if isinstance(x, list) else take(x) for x in state])
    return state, new_rows


def _unshare(state: DecodeState) -> DecodeState:
    # Compaction breaks the group-contiguous rows the shared prefix relies on: put each
    # row's prompt columns back in front of its completion columns first.
    if not state.prefix_keys:
        return state
    B, N = state.prefix_keys[0].shape[0], state.keys[0].shape[0]
    rows = mx.repeat(mx.arange(B), N // B)

    def join(prefix, suffix):
        return [mx.concatenate([p[rows], s], axis=2) for p, s in zip(prefix, suffix, strict=True)]

    return state._replace(
        keys=join(state.prefix_keys, state.keys),
        values=join(state.prefix_values, state.values),
        prefix_keys=[],
        prefix_values=[],
    )


class _Segments:
    """Host-side record of which original rows each decode step's outputs belong to."""

    def __init__(self, N: int):
        self.N, self.parts, self.steps = N, [], 0
        self.rows, self.toks, self.lps = np.arange(N), [], []

    def add(self, tokens, logprobs):
        self.toks.append(tokens)
        self.lps.append(logprobs)

    def cut(self, new_rows):
        if self.toks:
            self.parts.append(
                (self.rows, self.steps, mx.stack(self.toks, 1), mx.stack(self.lps, 1))
            )
            self.steps += len(self.toks)
        self.rows, self.toks, self.lps = new_rows, [], []

    def result(self):
        self.cut(self.rows)
        tokens = np.zeros((self.N, self.steps), np.int32)
        logprobs = np.zeros((self.N, self.steps), np.float32)
        for rows, t0, tok, lp in self.parts:
            ok = rows >= 0
            tokens[rows[ok], t0 : t0 + tok.shape[1]] = np.array(tok)[ok]
            logprobs[rows[ok], t0 : t0 + tok.shape[1]] = np.array(lp)[ok]
        return mx.array(tokens), mx.array(logprobs)


def _decode(model, cache, logits, key, prompts, sampling):
    """Sample up to ``max_tokens`` tokens for all ``N`` rows (ids, log-probs ``[N, T]``)."""
    G, T = sampling.group_size, sampling.max_tokens
    rows = mx.repeat(mx.arange(len(prompts)), G)
    from grpo.core.shared_prefix import prefix_sharing_verified  # (it imports this module)

    shared = prefix_sharing_verified(model)
    state = _initial_state(cache, prompts, sampling, logits.shape[-1], shared=shared)
    U = live_u = uniforms(key, len(prompts) * G, T)
    state, lp = _compiled_first(sampling)(logits[rows], state, U[:, 0])
    out = _Segments(len(prompts) * G)
    out.add(state.tokens, lp)
    params = model.parameters()  # the full tree, so nothing is baked into the compiled step
    step = _compiled_step(model, sampling)
    P = cache[0].size()
    for t in range(1, T):
        state = _grow(state, P + t - 1)
        state, lp = step(params, state, mx.array(P + t - 1, dtype=mx.int32), live_u[:, t])
        out.add(state.tokens, lp)
        # A blocking eval with no other reference to last step's buffers lets slice_update
        # write the KV cache in place; async_eval here would copy every buffer every step.
        mx.eval(state, lp)
        if t % CHECK_EVERY == 0 and (sampling.eos_ids or sampling.stop_sequences):
            ended = np.array(state.ended)
            if ended[out.rows >= 0].all():
                break
            state, new_rows = _compact(state, out.rows, ended)
            if new_rows is not out.rows:
                out.cut(new_rows)
                live_u = U[mx.array(np.maximum(new_rows, 0))]  # the kept rows' own draws
    return out.result()


def _assemble(prompts, lengths, tokens, logprobs, sampling):
    G = sampling.group_size
    ends = end_flags(tokens, eos_ids=sampling.eos_ids, stop_sequences=sampling.stop_sequences)
    mask = completion_mask(ends)
    completion_lengths = mask.sum(axis=-1).astype(mx.int32)
    T = max(int(mx.max(completion_lengths).item()), 1)
    P = max(lengths)
    prompt_ids = mx.array([list(p) + [0] * (P - len(p)) for p in prompts], dtype=mx.int32)
    rows = mx.repeat(mx.arange(len(prompts)), G)
    mask = mask[:, :T]
    return Rollout(
        prompt_ids=prompt_ids[rows],
        prompt_lengths=mx.array(lengths, dtype=mx.int32)[rows],
        completion_ids=mx.where(mask > 0, tokens[:, :T], 0).astype(mx.int32),
        logprobs=mx.where(mask > 0, logprobs[:, :T], 0.0).astype(mx.float32),
        completion_mask=mask,
        is_truncated=~mx.any(ends, axis=-1),
        completion_lengths=completion_lengths,
    )
