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

import json
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from grpo.core.forward import lora_reference_params
from grpo.io.fast_attention import install_fast_kernels

ADAPTER_LEAVES = ("lora_a", "lora_b")


@attrs.frozen
class Policy:
    """A model ready for GRPO: which weights train and what the reference is.

    Attributes:
        model: the ``mlx.nn.Module`` (LoRA layers already inserted for ``kind="lora"``).
        params: initial trainable parameter tree (what ``TrainState.params`` starts from);
            the trainer sets it to ``None`` once its state holds them.
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
    model, tokenizer = mlx_lm.load(
        str(path_or_repo), tokenizer_config=tokenizer_config, trust_remote_code=trust_remote_code
    )
    install_fast_kernels(model)
    return model, tokenizer


def load_trained(base: str, adapter_path: str, *, trust_remote_code: bool = False):
    """``(model, tokenizer)``: ``base`` with the adapters a run saved, as it was trained.

    Same as ``mlx_lm.load(base, adapter_path=adapter_path)``, except that adapters trained
    on a base quantized in memory (QLoRA with ``quantize_bits``; their
    ``adapter_config.json`` records ``quantization``) get that base quantized identically
    first, so the logits are those of the trained model, not of the float base plus
    adapters that never saw it.
    """
    from mlx_lm.tuner.utils import load_adapters

    config = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    model, tokenizer = load_model(base, trust_remote_code=trust_remote_code)
    q = config.get("quantization")
    if q is not None and not is_quantized(model):
        quantize(model, bits=q["bits"], group_size=q["group_size"])
    load_adapters(model, str(adapter_path))
    model.eval()
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


def lora_layers(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(block index, path inside the block, module)`` of every mlx-lm LoRA/DoRA layer."""
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    kinds = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
    return [
        (i, path, m)
        for i, layer in enumerate(model.layers)
        for path, m in layer.named_modules()
        if isinstance(m, kinds)
    ]


def existing_adapter_config(model: nn.Module, adapter_path=None) -> dict:
    """The adapter config of a model that already carries LoRA layers.

    ``adapter_path``'s ``adapter_config.json`` when given (what mlx-lm loaded), else read
    off the layers: rank, scale, dropout, the block-relative keys and how many final
    blocks carry adapters.
    """
    if adapter_path is not None:
        return json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    found = lora_layers(model)
    first = found[0][2]
    rank = first.lora_b.shape[-1] if first.lora_b.ndim == 3 else first.lora_a.shape[-1]
    params = {
        "rank": int(rank),
        "scale": float(first.scale),
        "dropout": float(getattr(first.dropout, "p", 0.0) if hasattr(first, "dropout") else 0.0),
        "keys": sorted({path for _, path, _ in found}),
    }
    num_layers = len(model.layers) - min(i for i, _, _ in found)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def _continue_lora(model: nn.Module, cfg: Any, base: str | None) -> Policy:
    # The model already carries adapters (loaded with adapter_path): they are what trains;
    # inserting LoRA again would nest a second adapter mlx-lm cannot load.
    model.freeze()
    model.unfreeze(keys=list(ADAPTER_LEAVES), strict=False)
    adapters = model.trainable_parameters()
    adapter_config = dict(existing_adapter_config(model, cfg.adapter_path))
    if adapter_config.get("fine_tune_type", "lora") != "lora":
        raise ValueError(
            f"adapter_path={cfg.adapter_path!r} holds fine_tune_type="
            f"{adapter_config['fine_tune_type']!r}; only LoRA adapters can be continued"
        )
    if base is not None:
        adapter_config["model"] = str(base)
    if cfg.quantize_bits is not None:
        adapter_config["quantization"] = {
            "bits": cfg.quantize_bits,
            "group_size": cfg.quantize_group_size,
        }
    ref = lora_reference_params(adapters) if cfg.beta > 0 else None
    return Policy(model, adapters, ref, "lora", adapter_config)


def model_type(model: nn.Module) -> str:
    """The mlx-lm ``model_type`` (from the model's args), else its module name."""
    t = getattr(getattr(model, "args", None), "model_type", None)
    return str(t) if t else type(model).__module__.rsplit(".", 1)[-1]


def check_supported(model: nn.Module, cfg: Any) -> None:
    """Refuse, naming the model type, what GRPO cannot train on this model.

    Also verifies (and records) whether the chunked-head training forward reproduces the
    model's own logits (:func:`grpo.core.lm.check_split`) and whether prompts can be
    shared (:func:`grpo.core.shared_prefix.check_prefix_sharing`); when they cannot, the
    model's own full forward / the packed rows are used, never an approximation.
    """
    from grpo.core.lm import check_linear_head, check_split
    from grpo.core.shared_prefix import check_prefix_sharing

    name = model_type(model)
    if getattr(cfg, "router_aux_loss_coef", 0.0):
        raise ValueError(
            f"router_aux_loss_coef={cfg.router_aux_loss_coef}: model_type {name!r} (like every "
            "mlx-lm model) does not expose its router logits, so there is no load-balancing "
            "loss to add; set router_aux_loss_coef=0"
        )
    was_training = model.training
    model.eval()
    try:
        out = model(mx.array([[1, 2, 3]], dtype=mx.int32))
    except Exception as e:
        raise ValueError(f"model_type {name!r} is not supported: its forward failed ({e})") from e
    finally:
        model.train(was_training)
    if not isinstance(out, mx.array) or out.ndim != 3 or out.shape[:2] != (1, 3):
        got = tuple(out.shape) if isinstance(out, mx.array) else type(out).__name__
        raise ValueError(
            f"model_type {name!r} is not supported: model(ids [1, 3]) must return logits "
            f"[1, 3, V], got {got}"
        )
    check_split(model)
    check_linear_head(model)
    check_prefix_sharing(model)


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
    adapter_path = getattr(cfg, "adapter_path", None)
    if adapter_path is not None and not cfg.use_lora:
        raise ValueError(
            f"adapter_path={adapter_path!r} with use_lora=False: fuse the adapters into the "
            "model first (mlx_lm.fuse) to fine-tune every weight"
        )
    if adapter_path is not None and not lora_layers(model):
        from mlx_lm.tuner.utils import load_adapters

        load_adapters(model, str(adapter_path))
    check_supported(model, cfg)
    if cfg.use_lora and lora_layers(model):
        return _continue_lora(model, cfg, base)
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
