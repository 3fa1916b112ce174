"""KV caches for grpo's forwards: a compile-friendly decode cache, and the two caches that
hold a group's shared prompt once (decoding and the training forward).

- :class:`FixedBatchKVCache`: the rollout's decode cache, a fixed-capacity buffer written at
  an array position, so one compiled step serves every position.
- :class:`SharedPrefixKVCache`: the rollout's decode cache when the prompt keys/values are
  stored once per group (read by :func:`grpo.core.attention.prefix_attention`).
- :class:`PrefixRecorder` / :class:`SharedPrefixTrainCache`: the training forward that runs each
  prompt once per block of rows sharing it (:mod:`grpo.core.shared_prefix`).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, KVCache

from grpo.core._deprecated import renamed


class FixedBatchKVCache(BatchKVCache):
    """An mlx-lm ``BatchKVCache`` over a fixed-capacity buffer written at an array position.

    mlx-lm's cache slices its buffer to the current length with a Python int, so each
    decode step has new shapes and a compiled step would retrace every token. Here the
    buffers keep shape ``[N, H, C, D]`` and the write column ``pos`` is an array, so one
    compiled step serves every position; columns past ``pos`` are masked out.
    """

    def __init__(self, keys: mx.array, values: mx.array, left_padding: mx.array, pos: mx.array):
        self.keys, self.values = keys, values
        self.left_padding = left_padding
        self.pos = pos
        self.offset = pos - left_padding  # RoPE position of the token being written
        self._idx = keys.shape[2]
        self._right_padding = None

    def _column(self) -> mx.array:
        return self.pos

    def update_and_fetch(self, keys, values):
        start = self._column().reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        cols = mx.arange(self.keys.shape[2])
        causal = cols[None, :] <= (self.pos + mx.arange(N))[:, None]
        return causal & (cols >= self.left_padding[:, None, None, None])


class SharedPrefixKVCache(FixedBatchKVCache):
    """A decode cache that holds each prompt's keys/values once, not once per group row.

    ``prefix_keys``/``prefix_values`` are ``[B, H, P, D]`` (the prefilled prompts);
    ``keys``/``values`` are ``[N, H, S, D]`` with only the completion columns, ``N = B*G``
    rows group-contiguous. Column ``pos`` of the full sequence is suffix column ``pos - P``.
    Only an attention function that reads the prefix from the cache can use it (the
    ``scaled_dot_product_attention`` that ``grpo.io.fast_attention`` installs, marked
    ``grpo_prefix_caches``); ``rollout`` falls back to :class:`FixedBatchKVCache` otherwise.
    """

    def __init__(self, prefix_keys, prefix_values, keys, values, left_padding, pos):
        super().__init__(keys, values, left_padding, pos)
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values

    def _column(self) -> mx.array:
        return self.pos - self.prefix_keys.shape[2]

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return None  # the attention builds both masks from prefix_mask / suffix_mask

    def prefix_mask(self) -> mx.array:
        """``[B, 1, 1, P]`` bool: prompt columns past each prompt's left padding."""
        B, P = self.prefix_keys.shape[0], self.prefix_keys.shape[2]
        first = self.left_padding.reshape(B, -1)[:, :1]
        return (mx.arange(P)[None, :] >= first)[:, None, None, :]

    def suffix_mask(self, L: int = 1) -> mx.array:
        """``[1, S]`` bool: completion columns written so far (every row is at the same step)."""
        return (mx.arange(self.keys.shape[2]) <= self._column())[None, :]


class PrefixRecorder(KVCache):
    """A cache-free causal forward that keeps each layer's (post-RoPE) keys and values."""

    grpo_cache_free = True  # attention may treat it as cache=None

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        # Some attentions (multi-head latent) need the mask as an array to add scores to.
        return create_causal_mask(N) if return_array else "causal"


class SharedPrefixTrainCache(KVCache):
    """The completion forward's cache: the block's prompt keys/values once, rows' own after.

    ``prefix_keys`` / ``prefix_values`` ``[B, H, P, D]``; ``offset`` ``[N]`` is each row's
    prompt length ``l_b`` (the RoPE position of its first completion token); prompt columns
    ``>= l_b`` (another row's completion tokens, or padding) are masked.
    """

    def __init__(self, prefix_keys, prefix_values, prompt_lengths):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.offset = prompt_lengths

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return None  # the prefix attention builds both masks

    def prefix_mask(self) -> mx.array:
        B, P = self.prefix_keys.shape[0], self.prefix_keys.shape[2]
        lengths = self.offset.reshape(B, -1)[:, :1]
        return (mx.arange(P)[None, :] < lengths)[:, None, None, :]

    def suffix_mask(self, L: int) -> mx.array:
        return mx.arange(L)[None, :] <= mx.arange(L)[:, None]


# The training forward's caches before they joined the shared-prefix family of names.
__getattr__ = renamed(
    __name__,
    {
        "PromptRecorder": "grpo.core.kv_cache.PrefixRecorder",
        "SharedPromptCache": "grpo.core.kv_cache.SharedPrefixTrainCache",
    },
)
