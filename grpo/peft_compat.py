"""TRL's ``peft_config`` on MLX: which weights train, as TRL decides it.

``GRPOTrainer(peft_config=None)`` trains every weight, as TRL does; a ``peft.LoraConfig`` (or
any object with its fields) trains LoRA adapters with its ``r``, ``lora_alpha``,
``lora_dropout`` and ``target_modules``, through mlx-lm's LoRA layers. ``GRPOConfig.use_lora``
set explicitly wins (the ``grpo`` CLI sets it to true for memory); left at ``None`` it
follows ``peft_config``, and a run that continues saved adapters (``adapter_path``, or a model
already carrying LoRA layers) or quantizes its base (``quantize_bits``) trains LoRA.
"""

from __future__ import annotations

import warnings
from typing import Any

import attrs
import mlx.nn as nn

from grpo.errors import ConfigError

# PEFT's default targets for Llama/Mistral/Qwen-style decoders when target_modules is None.
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")
# PEFT fields whose non-default value changes what trains; refused rather than ignored.
_REFUSED = {
    "bias": ("none", "LoRA bias terms are not trained by mlx-lm's LoRA layers"),
    "use_rslora": (False, "mlx-lm's LoRA scale is lora_alpha / r (rsLoRA's is alpha / sqrt(r))"),
    "use_dora": (False, "set use_dora through mlx-lm's DoRA fine-tuning instead"),
    "modules_to_save": (None, "fully training extra modules beside LoRA is not supported"),
    "layers_to_transform": (None, "use lora_num_layers to adapt the last N layers"),
}


def _linear_names(model: nn.Module) -> set[str]:
    layers = getattr(model, "layers", None) or []
    return {
        path.rsplit(".", 1)[-1]
        for layer in layers[:1]
        for path, m in layer.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    }


def _targets(peft_config: Any, model: nn.Module) -> tuple[str, ...] | None:
    targets = getattr(peft_config, "target_modules", None)
    if targets == "all-linear":
        return None  # mlx-lm's default: every linear layer of each block
    if isinstance(targets, str):
        return (targets,)
    if targets is not None:
        return tuple(targets)
    if set(PEFT_DEFAULT_TARGETS) <= _linear_names(model):
        return PEFT_DEFAULT_TARGETS
    warnings.warn(
        "peft_config.target_modules=None and the model has no q_proj/v_proj (PEFT's default "
        "targets); adapting every linear layer of each block instead",
        UserWarning,
        stacklevel=3,
    )
    return None


def resolve_lora(args: Any, peft_config: Any, model: nn.Module, *, has_lora: bool) -> Any:
    """``args`` (a ``GRPOConfig``) with ``use_lora`` and the LoRA fields decided.

    Args:
        args: the run's ``GRPOConfig``.
        peft_config: ``None``, a ``peft.LoraConfig``, or an object with its fields.
        model: the loaded model (to check default targets exist).
        has_lora: the model already carries LoRA layers.
    """
    if peft_config is None:
        use = args.use_lora
        if use is None:
            use = bool(args.adapter_path or args.quantize_bits or has_lora)
        return attrs.evolve(args, use_lora=use)
    if args.use_lora is False:
        raise ConfigError(
            "peft_config was given with use_lora=False; drop one of them (peft_config trains "
            "LoRA adapters, use_lora=False trains every weight)"
        )
    for name, (default, why) in _REFUSED.items():
        value = getattr(peft_config, name, default)
        if value not in (default, None, False, [], ()) and value != default:
            raise ConfigError(f"peft_config.{name}={value!r} is not supported: {why}")
    r = int(getattr(peft_config, "r", 8))
    return attrs.evolve(
        args,
        use_lora=True,
        lora_rank=r,
        lora_alpha=float(getattr(peft_config, "lora_alpha", 8)),
        lora_dropout=0.0
        if args.disable_dropout
        else float(getattr(peft_config, "lora_dropout", 0.0)),
        lora_target_modules=_targets(peft_config, model),
    )
