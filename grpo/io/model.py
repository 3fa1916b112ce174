"""Load the policy and set up what trains: LoRA / QLoRA adapters or every weight.

* LoRA: mlx-lm's own ``linear_to_lora_layers`` on a frozen base; the trainable tree is the
  adapters only. The reference policy is the *same* model with the adapters switched off
  (``lora_b = 0`` makes the adapter term exactly zero), so no base weights are copied.
* QLoRA: the same on a quantized base, either loaded quantized (``mlx_lm.convert -q``) or
  quantized here with ``nn.quantize`` (``quantize_bits``).
* Full fine-tune: every weight trains; with ``beta > 0`` an explicit frozen copy of the
  initial weights is the reference, never a silently dropped KL term.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from grpo.core.loss import lora_reference_params
from grpo.io.fast_attention import install_fast_kernels

ADAPTER_LEAVES = ("lora_a", "lora_b")


@attrs.frozen
class Policy:
    """A model ready for GRPO: which weights train and what the reference is.

    Attributes:
        model: the ``mlx.nn.Module`` (LoRA layers already inserted for ``kind="lora"``).
        params: initial trainable parameter tree (what ``TrainState.params`` starts from).
        ref_params: tree to ``model.update`` for the reference forward (adapters off for
            LoRA; a frozen copy of the initial weights for a full fine-tune), or ``None``
            when no reference is needed (``beta == 0``).
        kind: ``"lora"`` or ``"full"``.
        adapter_config: mlx-lm ``adapter_config.json`` content for LoRA, else ``None``.
    """

    model: Any
    params: Any
    ref_params: Any
    kind: str
    adapter_config: dict | None


def load_model(path_or_repo: str, *, trust_remote_code: bool = False):
    """``(model, tokenizer)`` through ``mlx_lm.load`` (local directory or hub id).

    On the CPU device the model's attention and SwiGLU are routed through
    :func:`grpo.io.fast_attention.install_fast_kernels` (same function, less CPU).
    """
    import mlx_lm

    tokenizer_config = {"trust_remote_code": True} if trust_remote_code else None
    model, tokenizer = mlx_lm.load(str(path_or_repo), tokenizer_config=tokenizer_config)
    install_fast_kernels(model)
    return model, tokenizer


def is_quantized(model: nn.Module) -> bool:
    """True if any submodule holds quantized weights."""
    return any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    )


def quantize(model: nn.Module, *, bits: int, group_size: int) -> nn.Module:
    """Quantize every ``Linear`` / ``Embedding`` whose input size ``group_size`` divides."""

    def predicate(path, module):
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return model


def _layer_keys(model: nn.Module, target_modules) -> list[str] | None:
    if target_modules is None:
        return None
    targets = set(target_modules)
    keys = sorted(
        {
            path
            for layer in model.layers
            for path, m in layer.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear))
            and (path in targets or path.rsplit(".", 1)[-1] in targets)
        }
    )
    if not keys:
        linear = sorted(
            {
                p
                for p, m in model.layers[0].named_modules()
                if isinstance(m, (nn.Linear, nn.QuantizedLinear))
            }
        )
        raise ValueError(
            f"lora_target_modules={list(target_modules)} matches no linear layer of the model; "
            f"available: {linear}"
        )
    return keys


def lora_adapter_config(model: nn.Module, cfg: Any, *, base: str | None = None) -> dict:
    """mlx-lm's ``adapter_config.json`` for ``cfg``'s LoRA settings on ``model``."""
    n_layers = len(model.layers)
    num_layers = n_layers if cfg.lora_num_layers is None else cfg.lora_num_layers
    if num_layers > n_layers:
        raise ValueError(
            f"lora_num_layers={num_layers} exceeds the model's {n_layers} transformer layers"
        )
    params = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
    keys = _layer_keys(model, cfg.lora_target_modules)
    if keys is not None:
        params["keys"] = keys
    out = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    if base is not None:
        out["model"] = str(base)
    return out


def add_lora(model: nn.Module, adapter_config: dict, *, key: mx.array) -> Any:
    """Freeze ``model``, insert LoRA layers; return the adapter tree (the trainable params).

    ``lora_a`` is re-drawn from ``key`` (mlx-lm draws it from the global RNG), so the
    initial adapters are a function of the seed; ``lora_b`` starts at zero as in LoRA.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, adapter_config["num_layers"], adapter_config["lora_parameters"])
    adapters = model.trainable_parameters()
    flat = tree_flatten(adapters)
    if not flat or any(name.rsplit(".", 1)[-1] not in ADAPTER_LEAVES for name, _ in flat):
        raise ValueError(
            "LoRA setup left non-adapter weights trainable or no adapters at all: "
            f"{[n for n, _ in flat][:8]}"
        )
    keys = mx.random.split(key, len(flat))
    fresh = []
    for (name, p), k in zip(flat, keys, strict=True):
        if name.endswith("lora_a"):
            bound = 1.0 / (p.shape[0] ** 0.5)
            p = mx.random.uniform(-bound, bound, p.shape, dtype=p.dtype, key=k)
        fresh.append((name, p))
    adapters = tree_unflatten(fresh)
    model.update(adapters)
    return adapters


def frozen_copy(params: Any) -> Any:
    """An evaluated copy of ``params`` that no optimizer update can reach."""
    copy = tree_map(lambda x: mx.array(x), params)
    mx.eval(copy)
    return copy


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    if cls not in _CHECKPOINTED:

        def __call__(self, *args, **kwargs):
            # Rollout (eval mode, KV caches) and the reference forward run the plain block;
            # only the training forward, the one that is differentiated, recomputes.
            if not self.training:
                return cls.__call__(self, *args, **kwargs)

            def block(params, *args, **kwargs):
                self.update(params)
                return cls.__call__(self, *args, **kwargs)

            return mx.checkpoint(block)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[cls] = type(
            f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "grpo_checkpointed": True}
        )
    return _CHECKPOINTED[cls]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass (``mx.checkpoint``).

    Only ``model.layers``' instances change class (to a subclass whose ``__call__`` is
    checkpointed in train mode), so other models of the same architecture are unaffected.
    """
    for layer in model.layers:
        if type(layer) not in _CHECKPOINTED.values():
            layer.__class__ = _checkpointed(type(layer))


def prepare_policy(model: nn.Module, cfg: Any, *, key: mx.array, base: str | None = None) -> Policy:
    """Set ``model`` up for training under ``cfg`` (LoRA, QLoRA or full fine-tune).

    Args:
        model: an mlx-lm model (modified in place: quantized and/or LoRA layers inserted).
        cfg: a :class:`grpo.config.GRPOConfig`.
        key: ``[2]`` uint32 RNG key for the adapter initialisation.
        base: the base model's path or hub id, recorded in the adapter config.
    """
    if cfg.quantize_bits is not None:
        if is_quantized(model):
            raise ValueError(
                f"quantize_bits={cfg.quantize_bits} but the model is already quantized; "
                "set quantize_bits=None to train LoRA on it as is"
            )
        quantize(model, bits=cfg.quantize_bits, group_size=cfg.quantize_group_size)
    # Same function to float32 rounding, and much less CPU per forward on this backend.
    install_fast_kernels(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not cfg.use_lora:
        if is_quantized(model):
            raise ValueError(
                "use_lora=False (full fine-tune) needs a non-quantized model; this model has "
                "quantized weights. Use use_lora=True (QLoRA) or load a float model."
            )
        model.unfreeze()
        params = model.trainable_parameters()
        ref = frozen_copy(params) if cfg.beta > 0 else None
        return Policy(model, params, ref, "full", None)
    adapter_config = lora_adapter_config(model, cfg, base=base)
    if cfg.quantize_bits is not None:
        adapter_config["quantization"] = {
            "bits": cfg.quantize_bits,
            "group_size": cfg.quantize_group_size,
        }
    adapters = add_lora(model, adapter_config, key=key)
    ref = lora_reference_params(adapters) if cfg.beta > 0 else None
    return Policy(model, adapters, ref, "lora", adapter_config)
