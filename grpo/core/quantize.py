"""The rollout's quantized copy of the policy (``rollout_quantization``).

.. math::

    \\pi_{samp} = \\pi\\big(\\,\\cdot\\,;\\ Q_b(W + s\\,B^\\top A^\\top)\\big), \\qquad
    Q_b = \\text{mlx affine quantization to } b \\in \\{4, 8\\} \\text{ bits}

The rollout samples from a copy of the model whose every ``Linear`` / ``Embedding`` is
quantized (``mlx.nn.quantize``); LoRA adapters are merged into their base weight first, so
the copy is the *current* policy, quantized. The training forward (old log-probs, loss)
stays in float; the loss corrects the difference with TRL's importance weights
(:mod:`grpo.core.importance`).

- :func:`quantized_copy` builds the copy's structure once;
- :func:`quantized_params` gives its parameters for the policy's current parameters, the
  whole tree, to pass to :func:`grpo.core.rollout.rollout` with ``model=copy``.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

ROLLOUT_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)  # what mlx's affine quantization takes
AUTO_GROUP_SIZES = (64, 32)  # tried in this order when the group size is not given


def _is_adapter(module: nn.Module) -> bool:
    # mlx-lm's LoRA / DoRA layers (Linear, Embedding, SwitchLinear) all carry lora_a and
    # merge into a plain layer with fuse().
    return "lora_a" in module and callable(getattr(module, "fuse", None))


def _leaf(module: nn.Module) -> bool:
    return not tree_flatten(module.children(), is_leaf=nn.Module.is_module)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # (path, layer) of every layer the copy quantizes: adapters (as one unit) and the
    # quantizable leaves outside them. Modules come parents first.
    out, adapters = [], []
    for path, m in model.named_modules():
        if any(path.startswith(a + ".") for a in adapters):
            continue
        if _is_adapter(m):
            adapters.append(path)
            out.append((path, m))
        elif hasattr(m, "to_quantized") and _leaf(m):
            out.append((path, m))
    return out


def _merged(layer: nn.Module) -> nn.Module:
    # The float layer the policy computes: an adapter fused into its base, else the layer.
    return layer.fuse(dequantize=True) if _is_adapter(layer) else layer


def check_float(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` holds quantized layers (a QLoRA base)."""
    # mlx's quantized layers (Linear, Embedding, mlx-lm's SwitchLinear) all hold scales.
    quantized = [path for path, m in model.named_modules() if "scales" in m and "weight" in m]
    if quantized:
        raise ValueError(
            f"rollout_quantization needs a float policy, but layers such as {quantized[0]!r} "
            "are already quantized (a QLoRA base: quantize_bits or a quantized checkpoint), "
            "so its rollout already runs on quantized weights; unset rollout_quantization "
            "or load the float model"
        )


def input_sizes(model: nn.Module) -> dict[str, int]:
    """``{path: input size}`` of every layer :func:`quantized_copy` quantizes (the axis
    mlx quantizes along, in groups)."""
    out = {}
    for path, m in _layers(model):
        inner = m
        if _is_adapter(m):
            inner = getattr(m, "linear", None) or getattr(m, "embedding", None) or m
        out[path] = int(inner.weight.shape[-1])
    return out


def rollout_group_size(model: nn.Module, group_size: int | None) -> int:
    """The quantization group size for ``model``: ``group_size`` when it divides every
    layer's input size, else (``None``) the first of 64, 32 that does.

    Raises:
        ValueError: naming ``rollout_quantization_group_size``, the layer whose input
            size it does not divide, and the fix (or, see :func:`check_float`, that the
            model is already quantized).
    """
    check_float(model)
    sizes = input_sizes(model)
    if not sizes:
        raise ValueError("rollout_quantization: the model has no Linear or Embedding layer")
    tries = AUTO_GROUP_SIZES if group_size is None else (group_size,)
    for g in tries:
        if all(n % g == 0 for n in sizes.values()):
            return g
    g = tries[-1]
    path, n = next((p, n) for p, n in sizes.items() if n % g)
    fits = [c for c in GROUP_SIZES if all(k % c == 0 for k in sizes.values())]
    fix = (
        f"set rollout_quantization_group_size={fits[-1]}"
        if fits
        else "unset rollout_quantization (no group size mlx takes divides every layer)"
    )
    raise ValueError(
        f"rollout_quantization_group_size={group_size}: no group size of "
        f"{list(tries)} divides the input size {n} of layer {path!r}; {fix}"
    )


def quantized_copy(model: nn.Module, *, bits: int, group_size: int) -> nn.Module:
    """A copy of ``model`` with adapters merged and every ``Linear`` / ``Embedding``
    quantized to ``bits`` (groups of ``group_size``), in eval mode.

    Its weights are those of ``model`` now; :func:`quantized_params` gives them for other
    parameters. ``model`` is not modified.
    """
    if bits not in ROLLOUT_BITS:
        raise ValueError(f"rollout_quantization must be one of {list(ROLLOUT_BITS)}, got {bits!r}")
    check_float(model)
    twin = copy.deepcopy(model)
    fused = [(p, _merged(m)) for p, m in _layers(twin) if _is_adapter(m)]
    if fused:
        twin.update_modules(tree_unflatten(fused))
    nn.quantize(twin, group_size=group_size, bits=bits)
    twin.freeze()
    twin.eval()
    return twin


def quantized_params(model: nn.Module, params: Any, *, bits: int, group_size: int) -> dict:
    """Every parameter of :func:`quantized_copy`'s model for policy parameters ``params``.

    .. math:: \\big(Q_b(W_\\ell + s_\\ell B_\\ell^\\top A_\\ell^\\top)\\big)_\\ell \\;\\cup\\;
              \\{\\text{other leaves (norms, biases outside quantized layers) as they are}\\}

    Args:
        model: the policy model (float; LoRA layers in place for LoRA runs); its
            parameters are restored afterwards.
        params: the policy's trainable tree (adapters, or every weight).
        bits, group_size: as given to :func:`quantized_copy`.

    Returns:
        A full parameter tree for the quantized copy, evaluated.
    """
    before = model.parameters()
    model.update(params)
    try:
        layers = _layers(model)
        done = {path for path, _ in layers}
        flat = []
        for path, layer in layers:
            q = _merged(layer).to_quantized(group_size=group_size, bits=bits)
            flat += [(f"{path}.{k}", v) for k, v in tree_flatten(q.parameters())]
        for name, value in tree_flatten(model.parameters()):
            if not _under(name, done):
                flat.append((name, value))
    finally:
        model.update(before)
    tree = tree_unflatten(flat)
    mx.eval(tree)
    return tree


def _under(name: str, paths: set[str]) -> bool:
    # True if leaf `name` sits inside one of the module `paths`.
    parts = name.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))
