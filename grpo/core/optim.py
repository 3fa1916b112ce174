"""Optimizers and learning-rate schedules with PyTorch's and transformers' semantics.

.. math::

    \\theta_t = \\theta_{t-1}(1 - \\eta_t\\lambda)
        - \\frac{\\eta_t}{1-\\beta_1^t}\\,
          \\frac{m_t}{\\sqrt{v_t}/\\sqrt{1-\\beta_2^t} + \\epsilon}

A TRL run builds ``torch.optim.AdamW`` (bias-corrected, decoupled weight decay) through
transformers' ``Trainer.create_optimizer``, which decays every parameter except biases and
norm weights, and a ``LambdaLR`` from ``transformers.get_scheduler`` whose factor for
optimizer step ``k`` (0-based) is ``lr_lambda(k)``. The optimizers here are
``mlx.optimizers`` classes set up to take exactly those steps, and :func:`make_schedule`
returns the same factor for every ``k``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

# -- learning-rate schedules (transformers.optimization) ---------------------------------


def _warmup(k: int, warmup: int) -> float:
    return k / max(1, warmup)


def _linear(k, *, warmup, total):
    if k < warmup:
        return _warmup(k, warmup)
    return max(0.0, (total - k) / max(1, total - warmup))


def _cosine(k, *, warmup, total, num_cycles=0.5, min_lr_rate=0.0):
    if k < warmup:
        return _warmup(k, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _cosine_with_restarts(k, *, warmup, total, num_cycles=1):
    if k < warmup:
        return _warmup(k, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial(k, *, warmup, total, lr_init, lr_end=1e-7, power=1.0):
    if not lr_init > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than the learning rate ({lr_init})")
    if k < warmup:
        return _warmup(k, warmup)
    if k > total:
        return lr_end / lr_init
    remaining = 1 - (k - warmup) / (total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _constant(k, *, warmup, total):
    return 1.0


def _constant_with_warmup(k, *, warmup, total):
    return _warmup(k, warmup) if k < warmup else 1.0


def _inverse_sqrt(k, *, warmup, total, timescale=None):
    timescale = timescale or warmup or 10_000
    if k < warmup:
        return _warmup(k, warmup)
    return 1.0 / math.sqrt((k + timescale - warmup) / timescale)


def _cosine_with_min_lr(
    k, *, warmup, total, lr_init, num_cycles=0.5, min_lr=None, min_lr_rate=None
):
    return _cosine(k, warmup=warmup, total=total, num_cycles=num_cycles,
                   min_lr_rate=_min_lr_rate(lr_init, min_lr, min_lr_rate))  # fmt: skip


def _cosine_warmup_with_min_lr(
    k, *, warmup, total, lr_init, num_cycles=0.5, min_lr=None, min_lr_rate=None, warmup_lr_rate=None
):
    rate = _min_lr_rate(lr_init, min_lr, min_lr_rate)
    if k < warmup:
        if warmup_lr_rate is None:
            return (k + 1.0) / max(1.0, warmup)
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * k / max(1, warmup - 1)
    progress = (k - warmup + 1.0) / max(1.0, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - rate) + rate)


def _min_lr_rate(lr_init, min_lr, min_lr_rate):
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("only one of min_lr or min_lr_rate may be set in lr_scheduler_kwargs")
    if min_lr is not None:
        return min_lr / lr_init
    if min_lr_rate is None:
        raise ValueError("needs min_lr or min_lr_rate in lr_scheduler_kwargs")
    return min_lr_rate


_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def _wsd(k, *, warmup, total, num_decay_steps, num_stable_steps=None, warmup_type="linear",
         decay_type="cosine", min_lr_ratio=0.0, num_cycles=0.5):  # fmt: skip
    if warmup_type not in _WSD_SHAPES or decay_type not in _WSD_SHAPES:
        raise ValueError(f"warmup_type and decay_type must be one of {list(_WSD_SHAPES)}")
    stable = total - warmup - num_decay_steps if num_stable_steps is None else num_stable_steps
    if k < warmup:
        p = k / max(1, warmup)
        f = {"linear": p, "cosine": 0.5 * (1.0 - math.cos(math.pi * p)),
             "1-sqrt": 1.0 - math.sqrt(1.0 - p)}[warmup_type]  # fmt: skip
        return max(0.0, f * (1.0 - min_lr_ratio) + min_lr_ratio)
    if k < warmup + stable:
        return 1.0
    if k < warmup + stable + num_decay_steps:
        p = (k - warmup - stable) / max(1, num_decay_steps)
        f = {"linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * p)),
             "1-sqrt": 1.0 - math.sqrt(p)}[decay_type]  # fmt: skip
        return max(0.0, f * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


# name -> (factor function, whether it takes the peak learning rate as ``lr_init``)
SCHEDULES: dict[str, tuple[Callable[..., float], bool]] = {
    "linear": (_linear, False),
    "cosine": (_cosine, False),
    "cosine_with_restarts": (_cosine_with_restarts, False),
    "polynomial": (_polynomial, True),
    "constant": (_constant, False),
    "constant_with_warmup": (_constant_with_warmup, False),
    "inverse_sqrt": (_inverse_sqrt, False),
    "cosine_with_min_lr": (_cosine_with_min_lr, True),
    "cosine_warmup_with_min_lr": (_cosine_warmup_with_min_lr, True),
    "warmup_stable_decay": (_wsd, False),
}
SCHEDULER_TYPES = tuple(SCHEDULES)
# transformers' metric-driven schedulers need an evaluation metric every step.
UNSUPPORTED_SCHEDULERS = {
    "reduce_lr_on_plateau": "it steps on an evaluation metric, which GRPO training does not produce",
    "greedy": "it steps on an evaluation metric, which GRPO training does not produce",
}


def lr_factor(
    scheduler_type: str,
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    scheduler_kwargs: dict | None = None,
) -> Callable[[int], float]:
    """transformers' ``lr_lambda`` for ``scheduler_type``: optimizer step ``k`` -> factor.

    The learning rate of step ``k`` (0-based) is ``learning_rate * factor(k)``. Raises
    ``ValueError`` naming the problem for an unknown type or bad ``scheduler_kwargs``.
    """
    if scheduler_type in UNSUPPORTED_SCHEDULERS:
        raise ValueError(
            f"lr_scheduler_type={scheduler_type!r} is not supported: "
            f"{UNSUPPORTED_SCHEDULERS[scheduler_type]}; use one of {list(SCHEDULER_TYPES)}"
        )
    if scheduler_type not in SCHEDULES:
        raise ValueError(
            f"lr_scheduler_type must be one of {list(SCHEDULER_TYPES)}, got {scheduler_type!r}"
        )
    fn, takes_lr = SCHEDULES[scheduler_type]
    extra = {"lr_init": learning_rate} if takes_lr else {}
    factor = partial(
        fn, warmup=warmup_steps, total=total_steps, **extra, **(scheduler_kwargs or {})
    )
    try:
        factor(0)
    except TypeError as e:
        raise ValueError(
            f"lr_scheduler_kwargs={scheduler_kwargs!r} do not fit "
            f"lr_scheduler_type={scheduler_type!r}: {e}"
        ) from None
    except ValueError as e:
        raise ValueError(f"lr_scheduler_type={scheduler_type!r}: {e}") from None
    return factor


def make_schedule(
    *,
    learning_rate: float,
    scheduler_type: str,
    warmup_steps: int,
    total_steps: int,
    scheduler_kwargs: dict | None = None,
) -> Callable[[mx.array], mx.array]:
    """Learning rate as a traceable function of the optimizer step (transformers' schedules).

    The factors of steps ``0 .. total_steps`` are computed once in double precision, as
    transformers' ``LambdaLR`` computes them, and looked up by step (clamped at the end).

    Args:
        learning_rate: peak learning rate.
        scheduler_type: one of :data:`SCHEDULER_TYPES`.
        warmup_steps: steps of warmup (see :func:`warmup_steps_for`).
        total_steps: optimizer steps of the run.
        scheduler_kwargs: transformers' ``lr_scheduler_kwargs`` (``num_cycles``, ``min_lr``,
            ``power``, ``num_decay_steps``, ...).

    Returns:
        ``schedule(step [] uint) -> lr [] float32``.
    """
    factor = lr_factor(
        scheduler_type,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        scheduler_kwargs=scheduler_kwargs,
    )
    table = mx.array([learning_rate * factor(k) for k in range(total_steps + 1)], mx.float32)

    def schedule(step: mx.array) -> mx.array:
        return table[mx.minimum(step, total_steps).astype(mx.int32)]

    return schedule


def warmup_steps_for(warmup_steps: float, warmup_ratio: float, total_steps: int) -> int:
    """transformers' warmup rounding: ``warmup_steps >= 1`` counts steps, a ``warmup_steps``
    in ``(0, 1)`` (transformers 5) or else ``warmup_ratio`` is a fraction of the run,
    rounded up."""
    if warmup_steps >= 1:
        return int(warmup_steps)
    return math.ceil(total_steps * (warmup_steps if warmup_steps > 0 else warmup_ratio))


# -- weight-decay groups (transformers.Trainer.get_decay_parameter_names) ----------------

NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters transformers' Trainer applies weight decay to.

    Every parameter except those inside a ``LayerNorm`` module and those whose dotted name
    (lower-cased) matches a pattern of :data:`NO_DECAY_PATTERNS` (biases, norm weights).
    """
    patterns = [re.compile(p) for p in NO_DECAY_PATTERNS]
    layernorms = [name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    names = (name for name, _ in tree_flatten(model.parameters()))
    return frozenset(
        name
        for name in names
        if not any(p.search(name.lower()) for p in patterns)
        and not any(name.startswith(f"{ln}.") for ln in layernorms if ln)
    )


class _DecayGroups:
    """Weight decay on the named parameters only (torch's two parameter groups)."""

    decay_names: frozenset[str] | None = None

    def apply_gradients(self, gradients: dict, parameters: dict):
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1
        weight_decay = self.weight_decay

        def one(path, gradient, parameter, state):
            # The decay is a per-parameter trace-time constant.
            decays = self.decay_names is None or path in self.decay_names
            self.weight_decay = weight_decay if decays else 0.0
            try:
                return self.apply_single(gradient, parameter, state)
            finally:
                self.weight_decay = weight_decay

        return tree_map_with_path(one, gradients, parameters, self.state)


def _bias_correction(beta: float, step: mx.array) -> mx.array:
    # 1 - beta**t without the cancellation of float32 powers near 1.
    return -mx.expm1(step.astype(mx.float32) * math.log(beta))


class AdamW(_DecayGroups, optim.Adam):
    """``torch.optim.AdamW``, in torch's order of operations: decoupled decay
    ``p *= 1 - lr * wd`` first, ``m.lerp_(g, 1 - b1)``, ``v = b2 v + (1 - b2) g g``, then
    ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``."""

    decoupled = True

    def __init__(self, learning_rate, *, betas, eps, weight_decay, decay_names=None):
        super().__init__(learning_rate, betas=list(betas), eps=eps, bias_correction=True)
        self.weight_decay = weight_decay
        self.decay_names = decay_names

    def apply_single(self, gradient, parameter, state):
        lr = self.learning_rate.astype(gradient.dtype)
        b1, b2 = self.betas
        if self.weight_decay and self.decoupled:
            parameter = parameter * (1 - lr * self.weight_decay)
        elif self.weight_decay:
            gradient = gradient + self.weight_decay * parameter
        m = state["m"] = state["m"] + (gradient - state["m"]) * (1 - b1)
        v = state["v"] = state["v"] * b2 + (1 - b2) * gradient * gradient
        bc1, bc2 = _bias_correction(b1, self.step), _bias_correction(b2, self.step)
        denom = mx.sqrt(v) / mx.sqrt(bc2) + self.eps
        return parameter - (lr / bc1) * (m / denom)


class Adam(AdamW):
    """``torch.optim.Adam``: as :class:`AdamW`, but weight decay is an L2 term added to the
    gradient (coupled), as torch adds it."""

    decoupled = False


class SGD(_DecayGroups, optim.SGD):
    """``torch.optim.SGD``: coupled weight decay; the momentum buffer starts as the first
    gradient (no dampening on step 1), then ``b = mu * b + (1 - dampening) * g``."""

    def __init__(self, learning_rate, *, weight_decay, momentum=0.0, dampening=0.0,
                 nesterov=False, decay_names=None):  # fmt: skip
        super().__init__(learning_rate, momentum=momentum, weight_decay=weight_decay,
                         dampening=dampening, nesterov=nesterov)  # fmt: skip
        self.decay_names = decay_names

    def apply_single(self, gradient, parameter, state):
        if self.momentum <= 0 or self.dampening <= 0:
            return super().apply_single(gradient, parameter, state)
        if self.weight_decay:
            gradient = gradient + self.weight_decay * parameter
        first = self.step == 1
        v = mx.where(first, gradient, self.momentum * state["v"] + (1 - self.dampening) * gradient)
        state["v"] = v
        update = gradient + self.momentum * v if self.nesterov else v
        return parameter - self.learning_rate.astype(gradient.dtype) * update


class Adafactor(_DecayGroups, optim.Adafactor):
    """transformers' ``Adafactor`` as its Trainer builds it for ``optim="adafactor"``:
    ``scale_parameter=False``, ``relative_step=False``, the configured learning rate."""

    def __init__(self, learning_rate, *, weight_decay, decay_names=None):
        super().__init__(learning_rate, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False)  # fmt: skip
        self.decay_names = decay_names


# -- optimizer names (transformers.training_args.OptimizerNames) -------------------------

ADAMW_NAMES = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_torch_xla",
               "adamw_torch_npu_fused", "adamw_apex_fused")  # fmt: skip
# Quantised or paged AdamW states save memory on CUDA; the update rule is AdamW's.
ADAMW_APPROXIMATIONS = ("adamw_8bit", "adamw_bnb_8bit", "adamw_torch_8bit", "adamw_torch_4bit",
                        "paged_adamw_32bit", "paged_adamw_8bit", "adamw_anyprecision")  # fmt: skip
OPTIMIZERS = ADAMW_NAMES + ADAMW_APPROXIMATIONS + ("adam", "sgd", "adafactor")


def optimizer_kind(name: str) -> str:
    """``"adamw" | "adam" | "sgd" | "adafactor"`` for a transformers ``optim`` name.

    Raises ``ValueError`` naming the supported names for any other.
    """
    if name in ADAMW_NAMES or name in ADAMW_APPROXIMATIONS:
        return "adamw"
    if name in ("adam", "sgd", "adafactor"):
        return name
    raise ValueError(
        f"optim={name!r} has no MLX implementation here; use one of {list(OPTIMIZERS)} "
        "(adamw_torch is TRL's default)"
    )


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """transformers' ``optim_args`` string ``"k1=v1,k2=v2"`` as a dict."""
    if not optim_args:
        return {}
    pairs = [item.split("=") for item in optim_args.replace(" ", "").split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"optim_args must look like 'key=value,key=value', got {optim_args!r}")
    return dict(pairs)


_SGD_ARGS = {"momentum": float, "dampening": float, "weight_decay": float,
             "nesterov": lambda v: v.lower() in ("true", "1", "yes")}  # fmt: skip


def build_optimizer(
    name: str,
    schedule: Callable[[mx.array], mx.array] | float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    optim_args: str | None = None,
    decay_names: frozenset[str] | None = None,
) -> optim.Optimizer:
    """The optimizer TRL's Trainer builds for ``optim=name``, as an ``mlx.optimizers`` object.

    Args:
        name: a transformers optimizer name (see :func:`optimizer_kind`).
        schedule: learning rate, or ``schedule(step) -> lr``.
        betas, eps: Adam's ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``.
        weight_decay: applied to ``decay_names`` only (every parameter when ``None``).
        optim_args: transformers' ``optim_args`` (``sgd``: momentum, dampening, nesterov,
            weight_decay).
        decay_names: dotted parameter names that decay (:func:`decay_parameter_names`).
    """
    kind = optimizer_kind(name)
    args = parse_optim_args(optim_args)
    if kind == "sgd":
        unknown = sorted(set(args) - set(_SGD_ARGS))
        if unknown:
            raise ValueError(f"optim_args {unknown} are not SGD's; known: {sorted(_SGD_ARGS)}")
        kw = {"weight_decay": weight_decay, **{k: _SGD_ARGS[k](v) for k, v in args.items()}}
        return SGD(schedule, decay_names=decay_names, **kw)
    if kind == "adafactor":
        return Adafactor(schedule, weight_decay=weight_decay, decay_names=decay_names)
    cls = AdamW if kind == "adamw" else Adam
    return cls(schedule, betas=betas, eps=eps, weight_decay=weight_decay, decay_names=decay_names)


def make_optimizer(
    cfg: Any, *, total_steps: int, decay_names: frozenset[str] | None = None
) -> optim.Optimizer:
    """The optimizer and schedule a ``GRPOConfig``-like ``cfg`` asks for.

    Args:
        cfg: any object with ``optim``, ``optim_args``, ``learning_rate``,
            ``lr_scheduler_type``, ``lr_scheduler_kwargs``, ``warmup_steps``,
            ``warmup_ratio``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``,
            ``adam_epsilon``.
        total_steps: optimizer steps of the run.
        decay_names: parameters that decay (``None``: all).
    """
    schedule = make_schedule(
        learning_rate=cfg.learning_rate,
        scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=warmup_steps_for(cfg.warmup_steps, cfg.warmup_ratio, total_steps),
        total_steps=total_steps,
        scheduler_kwargs=cfg.lr_scheduler_kwargs,
    )
    return build_optimizer(
        cfg.optim,
        schedule,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        optim_args=cfg.optim_args,
        decay_names=decay_names,
    )
