"""Group rollout: sample ``G`` completions for each of ``B`` prompts with real token ids.

``rollout(params, key, prompts, *, model, sampling)`` prefills every distinct prompt
once into mlx-lm ``BatchKVCache`` objects (left-padded, so ragged prompts get correct
masks and RoPE positions), replicates each prompt's cache to its ``G`` rows, and decodes
all ``N = B * G`` rows together. Sampling maths is compiled once per config; the token
loop is Python, as in ``mlx_lm.generate`` (STYLE rule 7), and syncs with the host only
every ``check_every`` steps to see whether every row has finished.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from grpo.core.sampling import SamplingConfig, make_sample_fn

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this
CHECK_EVERY = 8  # decode steps between host checks for "all rows finished"


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
        model: An mlx-lm model whose cache is one ``KVCache`` per layer.
        sampling: Sampling knobs; ``T <= sampling.max_tokens``.

    Returns:
        ``Rollout`` with ``N = B * G`` rows; ``T`` is the longest completion.
    """
    lengths = _check_prompts(prompts, model)
    B, G = len(prompts), sampling.group_size
    rows = mx.repeat(mx.arange(B), G)
    with _policy(model, params):
        cache, logits = _prefill(model, prompts, lengths)
        _replicate(cache, rows)
        tokens, logprobs = _decode(model, cache, logits[rows], key, prompts, sampling)
    return _assemble(prompts, lengths, tokens, logprobs, sampling)


def _check_prompts(prompts, model) -> list[int]:
    if not isinstance(prompts, list | tuple) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompts must all be non-empty, got lengths {lengths}")
    vocab = model.args.vocab_size if hasattr(model, "args") else None
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < (vocab or 2**31)]
        if bad:
            raise ValueError(f"prompts[{i}] holds token ids outside [0, {vocab}): {bad[:5]}")
    return lengths


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
    ids = mx.array([[0] * pad + list(p) for pad, p in zip(left, prompts)], dtype=mx.int32)
    cache = []
    for c in make_prompt_cache(model):
        if type(c) is not KVCache:
            raise ValueError(f"rollout needs a model whose cache is KVCache per layer, got {type(c).__name__}")
        cache.append(BatchKVCache(left))
    logits = model(ids, cache=cache)[:, -1, :]
    return cache, logits


def _replicate(cache, rows):
    # One prefill per prompt: gather row b of every layer's cache into its G rows.
    for c in cache:
        c.filter(rows)


@functools.lru_cache(maxsize=32)
def _compiled_sampler(sampling: SamplingConfig):
    return mx.compile(make_sample_fn(sampling))


def _seen_tokens(prompts, G, V):
    seen = np.zeros((len(prompts), V), dtype=bool)
    for b, p in enumerate(prompts):
        seen[b, np.asarray(p, dtype=np.int64)] = True
    return mx.array(np.repeat(seen, G, axis=0))


def _decode(model, cache, logits, key, prompts, sampling):
    sample = _compiled_sampler(sampling)
    penalty = sampling.repetition_penalty != 1.0
    N, V = logits.shape
    seen = _seen_tokens(prompts, sampling.group_size, V) if penalty else mx.zeros((1, 1), mx.bool_)
    keys = mx.random.split(key, sampling.max_tokens)
    stop = dict(eos_ids=sampling.eos_ids, stop_sequences=sampling.stop_sequences)
    toks, lps = [], []
    for t in range(sampling.max_tokens):
        tok, lp = sample(logits, seen, keys[t])
        toks.append(tok)
        lps.append(lp)
        if t + 1 == sampling.max_tokens:
            break
        if penalty:
            seen = mx.put_along_axis(seen, tok[:, None], mx.array(True), axis=-1)
        logits = model(tok[:, None], cache=cache)[:, -1, :]
        mx.async_eval(logits, tok, lp)
        if (t + 1) % CHECK_EVERY == 0 and _all_ended(mx.stack(toks, axis=1), stop):
            break
    return mx.stack(toks, axis=1), mx.stack(lps, axis=1)


def _all_ended(tokens, stop) -> bool:
    if not stop["eos_ids"] and not stop["stop_sequences"]:
        return False
    return bool(mx.all(mx.any(end_flags(tokens, **stop), axis=-1)).item())


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
