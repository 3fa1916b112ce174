"""Independent NumPy re-derivations of what a TRL run's optimizer does, for comparison tests.

- ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` (``foreach=False`` single-tensor path) and
  transformers' ``Adafactor``, in float32 as torch runs them on float32 parameters, with the
  scalar factors (bias corrections, step size) in Python double as torch computes them.
- ``torch.nn.utils.clip_grad_norm_``.
- transformers' ``get_scheduler`` factors, vectorised over the step index ``k``.
- transformers' ``Trainer.get_decay_parameter_names`` split by name.
"""

import math
import re

import numpy as np

F32 = np.float32


# -- schedules: factor(k) for k = 0..n-1 -------------------------------------------------


def hf_lr_factors(name, n, *, warmup, total, lr=1.0, **kw):
    k = np.arange(n, dtype=np.float64)
    ramp = k / max(1, warmup)
    after = k >= warmup
    progress = (k - warmup) / max(1, total - warmup)
    if name == "constant":
        return np.ones(n)
    if name == "constant_with_warmup":
        body = np.ones(n)
    elif name == "linear":
        body = np.clip((total - k) / max(1, total - warmup), 0.0, None)
    elif name in ("cosine", "cosine_with_min_lr"):
        cycles = kw.get("num_cycles", 0.5)
        rate = kw.get("min_lr_rate", kw["min_lr"] / lr if "min_lr" in kw else 0.0)
        body = 0.5 * (1 + np.cos(np.pi * cycles * 2 * progress))
        body = np.clip(body * (1 - rate) + rate, 0.0, None)
    elif name == "cosine_with_restarts":
        cycles = kw.get("num_cycles", 1)
        body = 0.5 * (1 + np.cos(np.pi * np.mod(cycles * progress, 1.0)))
        body = np.where(progress >= 1.0, 0.0, np.clip(body, 0.0, None))
    elif name == "polynomial":
        end, power = kw.get("lr_end", 1e-7), kw.get("power", 1.0)
        frac = np.clip(1 - (k - warmup) / (total - warmup), 0.0, None)
        body = np.where(k > total, end / lr, ((lr - end) * frac**power + end) / lr)
    elif name == "inverse_sqrt":
        ts = kw.get("timescale") or warmup or 10_000
        with np.errstate(divide="ignore", invalid="ignore"):  # only read where k >= warmup
            body = np.sqrt(ts / (k + ts - warmup))
    elif name == "cosine_warmup_with_min_lr":
        rate = kw.get("min_lr_rate", kw["min_lr"] / lr if "min_lr" in kw else 0.0)
        p = (k - warmup + 1.0) / max(1.0, total - warmup)
        body = np.clip(
            (0.5 * (1 + np.cos(np.pi * 2 * kw.get("num_cycles", 0.5) * p))) * (1 - rate) + rate,
            0,
            None,
        )
        ramp = (k + 1.0) / max(1.0, warmup)
    elif name == "warmup_stable_decay":
        decay, ratio = kw["num_decay_steps"], kw.get("min_lr_ratio", 0.0)
        stable = kw.get("num_stable_steps", total - warmup - decay)
        p = (k - warmup - stable) / max(1, decay)
        shape = 0.5 * (1 + np.cos(np.pi * 2 * kw.get("num_cycles", 0.5) * np.clip(p, 0, 1)))
        body = np.where(
            k < warmup + stable,
            1.0,
            np.where(k < warmup + stable + decay, shape * (1 - ratio) + ratio, ratio),
        )
        ramp = ramp * (1 - ratio) + ratio
    else:
        raise KeyError(name)
    return np.where(after, body, ramp)


# -- optimizers: one step on float32 arrays, state dicts updated in place ----------------


def torch_adamw(p, g, st, *, t, lr, b1, b2, eps, wd, decoupled=True):
    if not decoupled and wd:
        g = (g + F32(wd) * p).astype(F32)
    if decoupled:
        p = (p * F32(1 - lr * wd)).astype(F32)
    m = st.setdefault("m", np.zeros_like(p))
    v = st.setdefault("v", np.zeros_like(p))
    m += (g - m) * F32(1 - b1)  # exp_avg.lerp_(grad, 1 - beta1)
    v *= F32(b2)
    v += F32(1 - b2) * g * g
    bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
    denom = np.sqrt(v) / F32(bc2_sqrt) + F32(eps)
    return (p - F32(lr / bc1) * (m / denom)).astype(F32)


def torch_sgd(p, g, st, *, t, lr, wd, momentum=0.0, dampening=0.0, nesterov=False):
    if wd:
        g = (g + F32(wd) * p).astype(F32)
    if momentum:
        if t == 1:
            st["buf"] = g.copy()
        else:
            st["buf"] = (st["buf"] * F32(momentum) + F32(1 - dampening) * g).astype(F32)
        g = (g + F32(momentum) * st["buf"]).astype(F32) if nesterov else st["buf"]
    return (p - F32(lr) * g).astype(F32)


def hf_adafactor(p, g, st, *, t, lr, wd, eps=(1e-30, 1e-3), clip=1.0, decay_rate=-0.8):
    # transformers.optimization.Adafactor.step with scale_parameter=False, relative_step=False.
    beta2t = F32(1.0 - t**decay_rate)
    upd = g * g + F32(eps[0])
    if p.ndim >= 2:
        row = st.setdefault("row", np.zeros(p.shape[:-1], F32))
        col = st.setdefault("col", np.zeros(p.shape[:-2] + p.shape[-1:], F32))
        row *= beta2t
        row += (1 - beta2t) * upd.mean(axis=-1)
        col *= beta2t
        col += (1 - beta2t) * upd.mean(axis=-2)
        r = 1 / np.sqrt(row / row.mean(axis=-1, keepdims=True))
        upd = r[..., None] * (1 / np.sqrt(col))[..., None, :] * g
    else:
        sq = st.setdefault("sq", np.zeros_like(p))
        sq *= beta2t
        sq += (1 - beta2t) * upd
        upd = g / np.sqrt(sq)
    rms = np.sqrt(np.mean(upd.astype(np.float64) ** 2))
    upd = (upd / F32(max(1.0, rms / clip)) * F32(lr)).astype(F32)
    if wd:
        p = (p + p * F32(-wd * lr)).astype(F32)
    return (p - upd).astype(F32)


def torch_clip_grad_norm(grads, max_norm):
    """``clip_grad_norm_``: (clipped grads, total norm before clipping)."""
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    if max_norm <= 0:
        return grads, total
    coef = min(max_norm / (total + 1e-6), 1.0)
    return {k: (g * F32(coef)).astype(F32) for k, g in grads.items()}, total


_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def hf_decays(name):
    """Whether transformers' Trainer decays the parameter called ``name`` (by name)."""
    return not any(re.search(p, name.lower()) for p in _NO_DECAY)
