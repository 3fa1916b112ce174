"""Installs grpo's CPU attention and SwiGLU (:mod:`grpo.core.attention`) in an mlx-lm
model's module, by name, on the CPU device only."""

from __future__ import annotations

import sys
import types
from typing import Any

from grpo.core import fastmath
from grpo.core.attention import (  # noqa: F401  (the kernels, also importable from here)
    DEFAULT_BLOCK,
    attention,
    block_causal_attention,
    make_attention,
    make_swiglu,
    prefix_attention,
)


def _swap(module, name: str, make) -> None:
    current = getattr(module, name, None)
    if current is None:
        return
    original = getattr(current, "grpo_original", current)
    setattr(module, name, original if make is None else make(original))


def install_fast_kernels(
    model: Any, *, block: int | None = DEFAULT_BLOCK, enabled: bool = True
) -> bool:
    """Route ``model``'s attention and SwiGLU through this module's CPU kernels.

    ``model`` is an mlx-lm model or the mlx-lm architecture module itself
    (``mlx_lm.models.llama``).

    Patches the ``scaled_dot_product_attention`` and ``swiglu`` names of the mlx-lm module
    that defines ``model`` (every instance of that architecture in this process is
    affected, which is harmless: the kernels compute the same function, and GPU calls
    fall through unchanged). ``block=None`` turns off only the block-causal split;
    ``enabled=False`` restores mlx-lm's functions. Returns True when the kernels are in.
    """
    if block is not None and block < 1:
        raise ValueError(f"attention block must be >= 1 or None, got {block!r}")
    module = (
        model if isinstance(model, types.ModuleType) else sys.modules.get(type(model).__module__)
    )
    if module is None or not hasattr(module, "scaled_dot_product_attention"):
        return False
    on = enabled and fastmath.on_cpu()
    _swap(
        module, "scaled_dot_product_attention", (lambda o: make_attention(o, block)) if on else None
    )
    _swap(module, "swiglu", make_swiglu if on else None)
    return on
