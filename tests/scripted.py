"""A scripted Sampler: fixed completions instead of a model, for multi-turn tests."""

import mlx.core as mx

from grpo.core.rollout import Rollout, completion_mask, end_flags


class Scripted:
    """A Sampler that returns scripted completions and records every call's prompts.

    ``script`` is a list of calls; each call is a list of completions (one per returned row,
    ``len(prompts) * group_size`` of them). Log-probs are ``-(t + 1) / 10 - call`` so every
    sampled token is identifiable.
    """

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def __call__(self, params, key, prompts, *, model, sampling):
        call = len(self.calls)
        self.calls.append(([list(p) for p in prompts], sampling))
        rows = self.script[call]
        G = sampling.group_size
        assert len(rows) == len(prompts) * G
        T = max(len(r) for r in rows)
        ids = mx.array([r + [0] * (T - len(r)) for r in rows], dtype=mx.int32)
        ends = end_flags(ids, eos_ids=sampling.eos_ids) & (
            mx.arange(T)[None] < mx.array([len(r) for r in rows])[:, None]
        )
        mask = completion_mask(ends) * (
            mx.arange(T)[None] < mx.array([len(r) for r in rows])[:, None]
        )
        lps = mx.array([[-(t + 1) / 10 - call for t in range(T)] for _ in rows]) * mask
        P = max(len(p) for p in prompts)
        prompt_ids = mx.array([list(p) + [0] * (P - len(p)) for p in prompts])
        idx = mx.repeat(mx.arange(len(prompts)), G)
        return Rollout(
            prompt_ids=prompt_ids[idx],
            prompt_lengths=mx.array([len(p) for p in prompts])[idx],
            completion_ids=ids * mask.astype(mx.int32),
            logprobs=lps,
            completion_mask=mask,
            is_truncated=~mx.any(ends, axis=-1),
            completion_lengths=mask.sum(-1).astype(mx.int32),
        )


class ByContext:
    """A Sampler whose completion of each row is ``fn(context_ids, g)`` (``g``: the row's
    index in its group), so a scripted policy can answer tool results over many steps."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, params, key, prompts, *, model, sampling):
        G = sampling.group_size
        rows = [[self.fn(list(p), g) for g in range(G)] for p in prompts]
        return Scripted([[r for group in rows for r in group]])(
            params, key, prompts, model=model, sampling=sampling
        )
