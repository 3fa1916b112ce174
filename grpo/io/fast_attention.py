"""Block-causal attention for full-sequence forwards (loss, reference and old log-probs).

MLX's CPU ``scaled_dot_product_attention`` has no fused kernel: it forms every score of
the ``[L, L]`` matrix, masks the upper triangle and runs a softmax whose ``exp`` is the
slowest op of the CPU backend (scalar, single-threaded). On the GRPO loss forward this is
most of the step (docs/benchmarks.md). Splitting the queries into blocks of ``block`` rows,
each attending only to the keys up to its own last row, skips the masked work: with
``n = ceil(L / block)`` blocks the scores computed drop to about ``(n + 1) / (2n)`` of
``L^2``. The result is the same softmax (masked scores contribute exactly 0); only the
summation order inside a row can differ, at float32 rounding level.

Only the cache-free, ``mask="causal"`` call of a full sequence takes this path; decoding
with a KV cache, explicit masks, attention sinks and GPU (Metal/CUDA) devices keep mlx-lm's
own function.
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx

DEFAULT_BLOCK = 64


def block_causal_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, block: int
) -> mx.array:
    """Causal ``softmax(q k^T * scale) v`` computed one block of query rows at a time.

    Args:
        queries: ``[B, Hq, L, D]``.
        keys: ``[B, Hkv, L, D]`` (``Hq`` a multiple of ``Hkv``).
        values: ``[B, Hkv, L, Dv]``.
        scale: score scale.
        block: query rows per block (``>= 1``).

    Returns:
        ``[B, Hq, L, Dv]``, equal to ``mx.fast.scaled_dot_product_attention(..., mask="causal")``.
    """
    L = queries.shape[2]
    if block < 1:
        raise ValueError(f"block_causal_attention: block must be >= 1, got block={block!r}")
    if keys.shape[2] != L:
        raise ValueError(
            f"block_causal_attention: needs as many keys as queries; got queries "
            f"{tuple(queries.shape)}, keys {tuple(keys.shape)}"
        )
    sdpa = mx.fast.scaled_dot_product_attention
    if L <= block:
        return sdpa(queries, keys, values, scale=scale, mask="causal")
    outs = []
    for start in range(0, L, block):
        stop = min(start + block, L)
        # "causal" aligns the q rows with the last keys: rows start..stop-1 see keys < row+1.
        outs.append(
            sdpa(
                queries[:, :, start:stop],
                keys[:, :, :stop],
                values[:, :, :stop],
                scale=scale,
                mask="causal",
            )
        )
    return mx.concatenate(outs, axis=2)


def _wrap(original, block: int):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if (
            cache is None
            and sinks is None
            and isinstance(mask, str)
            and mask == "causal"
            and queries.shape[2] == keys.shape[2]
            and queries.shape[2] > block
        ):
            return block_causal_attention(queries, keys, values, scale=scale, block=block)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.grpo_original = original
    scaled_dot_product_attention.grpo_block = block
    return scaled_dot_product_attention


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu or not mx.metal.is_available()


def install_block_attention(model: Any, *, block: int | None = DEFAULT_BLOCK) -> bool:
    """Route ``model``'s cache-free causal attention through :func:`block_causal_attention`.

    Patches the ``scaled_dot_product_attention`` name of the mlx-lm module that defines
    ``model`` (every instance of that architecture in this process is affected, which is
    harmless: other calls fall through unchanged). ``block=None`` restores mlx-lm's
    function. Returns True when the block path is installed.
    """
    module = sys.modules.get(type(model).__module__)
    current = getattr(module, "scaled_dot_product_attention", None)
    if current is None:
        return False
    original = getattr(current, "grpo_original", current)
    if block is None or not _on_cpu():
        module.scaled_dot_product_attention = original
        return False
    if block < 1:
        raise ValueError(f"attention_block_size must be >= 1 or None, got {block!r}")
    module.scaled_dot_product_attention = _wrap(original, block)
    return True
