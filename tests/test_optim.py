"""The optimizer side equals a TRL run's: torch's AdamW / Adam / SGD, transformers' Adafactor,
schedules, warmup rounding, weight-decay groups and gradient clipping, step for step.

The references (tests/reference_torch_optim.py) are NumPy re-derivations of torch's and
transformers' code, not of this project's.
"""

import math
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten
from reference_torch_optim import (
    hf_adafactor,
    hf_decays,
    hf_lr_factors,
    torch_adamw,
    torch_clip_grad_norm,
    torch_sgd,
)

import grpo  # noqa: F401
from grpo.config import GRPOConfig
from grpo.core.optim import (
    SCHEDULER_TYPES,
    decay_parameter_names,
    make_optimizer,
    make_schedule,
    optimizer_kind,
    warmup_steps_for,
)
from grpo.core.state import init_state
from grpo.core.step import make_train_step

STEPS = 200
SCHEDULE_KWARGS = {
    "cosine_with_restarts": {"num_cycles": 3},
    "polynomial": {"power": 2.0, "lr_end": 1e-4},
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr": 1e-3},
    "warmup_stable_decay": {"num_decay_steps": 60},
}
OPTIMIZERS = {
    "adamw_torch": None,
    "adam": None,
    "sgd": "momentum=0.9,dampening=0.1",
    "adafactor": None,
}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(6)
        self.mlp = nn.Linear(6, 8, bias=True)
        self.ln = nn.LayerNorm(6)  # a LayerNorm module whose name says nothing
        self.q_norm = nn.RMSNorm(6)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [Block()]
        self.norm = nn.RMSNorm(6)
        self.lm_head = nn.Linear(6, 5, bias=False)


class Grads(NamedTuple):
    g: Any  # the gradient tree, each leaf with a leading micro-batch axis of 1


def _toy_params(seed=0):
    rng = np.random.default_rng(seed)
    names = [n for n, _ in tree_flatten(Toy().parameters())]
    shapes = dict(tree_flatten(Toy().parameters()))
    return {n: rng.normal(size=shapes[n].shape).astype(np.float32) for n in names}


def _gradients(names_shapes, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        scale = math.exp(rng.uniform(-4.0, 0.5))  # norms from ~0.1 to ~15 around max_norm 1
        out.append({n: (rng.normal(size=s) * scale).astype(np.float32) for n, s in names_shapes})
    return out


def _reference_step(name, p, g, st, *, t, lr, wd, cfg):
    if name == "adamw_torch":
        return torch_adamw(p, g, st, t=t, lr=lr, b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                           eps=cfg.adam_epsilon, wd=wd)  # fmt: skip
    if name == "adam":
        return torch_adamw(p, g, st, t=t, lr=lr, b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                           eps=cfg.adam_epsilon, wd=wd, decoupled=False)  # fmt: skip
    if name == "sgd":
        return torch_sgd(p, g, st, t=t, lr=lr, wd=wd, momentum=0.9, dampening=0.1)
    return hf_adafactor(p, g, st, t=t, lr=lr, wd=wd)


def _run_project(cfg, params0, grads):
    model = Toy()
    optimizer = make_optimizer(cfg, total_steps=STEPS, decay_names=decay_parameter_names(model))
    params = tree_unflatten([(n, mx.array(v)) for n, v in params0.items()])
    state = init_state(params, optimizer, key=mx.random.key(0))
    step = make_train_step(
        lambda p, b: (
            sum((x * y).sum() for x, y in zip(_leaves(p), _leaves(b.g), strict=True)),
            {},
        ),
        optimizer,
        **cfg.train_step_kwargs(),
        mask_of=lambda b: mx.ones((1, 1, 1)),
    )
    lrs, norms = [], []
    for g in grads:
        batch = Grads(tree_unflatten([(n, mx.array(v)[None]) for n, v in g.items()]))
        state, metrics = step(state, batch)
        lrs.append(metrics["learning_rate"].item())
        norms.append(metrics["grad_norm"].item())
    return {n: np.array(v) for n, v in tree_flatten(state.params)}, lrs, norms


def _leaves(tree):
    return [v for _, v in tree_flatten(tree)]


def _run_reference(name, cfg, params0, grads, factors):
    params, states, lrs, norms = dict(params0), {n: {} for n in params0}, [], []
    for t, g in enumerate(grads, start=1):
        lr = cfg.learning_rate * factors[t - 1]
        g, norm = torch_clip_grad_norm(g, cfg.max_grad_norm)
        for n in params:
            wd = cfg.weight_decay if hf_decays(n) and not n.startswith("layers.0.ln.") else 0.0
            params[n] = _reference_step(
                name, params[n], g[n], states[n], t=t, lr=lr, wd=wd, cfg=cfg
            )
        lrs.append(lr)
        norms.append(norm)
    return params, lrs, norms


@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["nowd", "wd"])
@pytest.mark.parametrize("schedule", SCHEDULER_TYPES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_matches_torch_for_200_steps(name, schedule, wd, clip):
    cfg = GRPOConfig(
        num_generations=2, per_device_train_batch_size=2, learning_rate=1e-2,
        optim=name, optim_args=OPTIMIZERS[name], weight_decay=wd, max_grad_norm=clip,
        lr_scheduler_type=schedule, lr_scheduler_kwargs=SCHEDULE_KWARGS.get(schedule),
        warmup_ratio=0.1,
    )  # fmt: skip
    params0 = _toy_params()
    grads = _gradients([(n, v.shape) for n, v in params0.items()])
    warmup = warmup_steps_for(cfg.warmup_steps, cfg.warmup_ratio, STEPS)
    assert warmup == 20
    factors = hf_lr_factors(schedule, STEPS + 1, warmup=warmup, total=STEPS, lr=cfg.learning_rate,
                            **SCHEDULE_KWARGS.get(schedule, {}))  # fmt: skip
    got, lrs, norms = _run_project(cfg, params0, grads)
    want, want_lrs, want_norms = _run_reference(name, cfg, params0, grads, factors)
    np.testing.assert_allclose(lrs, want_lrs, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    for n in want:
        moved = np.abs(want[n] - params0[n]).max()
        assert moved > 0, n
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-6 * np.abs(want[n]).max(),
                                   err_msg=n)  # fmt: skip


def test_decay_groups_follow_transformers_names():
    names = decay_parameter_names(Toy())
    for n, _ in tree_flatten(Toy().parameters()):
        in_layernorm = n.startswith("layers.0.ln.")
        assert (n in names) == (hf_decays(n) and not in_layernorm), n
    # Biases, every norm weight and the LayerNorm module are excluded; the rest decays.
    assert names == {"layers.0.mlp.weight", "lm_head.weight"}


def test_no_decay_on_excluded_parameters_with_adamw():
    # The whole run with a huge weight decay and zero gradients: excluded parameters stay.
    cfg = GRPOConfig(num_generations=2, per_device_train_batch_size=2, learning_rate=0.1,
                     weight_decay=5.0, lr_scheduler_type="constant")  # fmt: skip
    params0 = _toy_params()
    zero = [{n: np.zeros_like(v) for n, v in params0.items()}] * 3
    got, _, _ = _run_project(cfg, params0, zero)
    for n in params0:
        shrink = (1 - 0.1 * 5.0) ** 3 if n in {"layers.0.mlp.weight", "lm_head.weight"} else 1.0
        np.testing.assert_allclose(got[n], params0[n] * np.float32(shrink), rtol=1e-6, err_msg=n)


@pytest.mark.parametrize("schedule", SCHEDULER_TYPES)
@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_schedule_equals_transformers_at_every_step(schedule, warmup):
    total, lr = 50, 3e-4
    kw = dict(SCHEDULE_KWARGS.get(schedule, {}))
    if schedule == "warmup_stable_decay":
        kw["num_decay_steps"] = 20
    sched = make_schedule(learning_rate=lr, scheduler_type=schedule, warmup_steps=warmup,
                          total_steps=total, scheduler_kwargs=kw)  # fmt: skip
    got = np.array([sched(mx.array(k, mx.uint64)).item() for k in range(total + 1)])
    want = lr * hf_lr_factors(schedule, total + 1, warmup=warmup, total=total, lr=lr, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-13)


@given(
    total=st.integers(1, 10_000),
    ratio=st.floats(0.0, 1.0),
    steps=st.one_of(st.integers(1, 500), st.floats(0.001, 0.999)),
)
def test_warmup_rounding_is_transformers(total, ratio, steps):
    # transformers 5: int(warmup_steps) when >= 1, else ceil(total * warmup_steps); and the
    # 4.x rule for warmup_ratio when warmup_steps is 0.
    want = int(steps) if steps >= 1 else math.ceil(total * steps)
    assert warmup_steps_for(steps, ratio, total) == want
    assert warmup_steps_for(0, ratio, total) == math.ceil(total * ratio)


@pytest.mark.parametrize(
    "name",
    ["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_8bit", "paged_adamw_32bit"],
)
def test_adamw_names_map_to_torch_adamw(name):
    assert optimizer_kind(name) == "adamw"
    opt = make_optimizer(GRPOConfig(optim=name), total_steps=3)
    assert opt.bias_correction and type(opt).__name__ == "AdamW"


@pytest.mark.parametrize("name", ["lion_8bit", "galore_adamw", "rmsprop", "schedule_free_adamw"])
def test_other_optimizer_names_are_refused_naming_them(name):
    with pytest.raises(ValueError, match=f"optim='{name}'"):
        GRPOConfig(optim=name)


def test_sgd_nesterov_and_plain_momentum_match_torch():
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(20)]
    for args, kw in [("momentum=0.8,nesterov=true", dict(momentum=0.8, nesterov=True)),
                     ("momentum=0.5", dict(momentum=0.5)), (None, {})]:  # fmt: skip
        cfg = GRPOConfig(optim="sgd", optim_args=args, learning_rate=0.05, weight_decay=0.01,
                         lr_scheduler_type="constant")  # fmt: skip
        opt = make_optimizer(cfg, total_steps=20)
        params = {"w": mx.array(p0)}
        opt.init(params)
        ref, st_ = p0.copy(), {}
        for t, g in enumerate(grads, start=1):
            params = opt.apply_gradients({"w": mx.array(g)}, params)
            ref = torch_sgd(ref, g, st_, t=t, lr=0.05, wd=0.01, **kw)
        np.testing.assert_allclose(np.array(params["w"]), ref, rtol=1e-6, atol=1e-7)


def test_first_trainer_update_is_torch_adamw_of_its_gradient(tiny_model_dir, tmp_path):
    """A real run (full fine-tune, weight decay, clipping on): the first optimizer step equals
    torch's AdamW applied to that step's gradient, and the logged learning rate is the
    schedule's at every step."""
    from helpers import PROMPTS, flat_numpy, tiny_args
    from mlx.utils import tree_map

    from grpo.io.logging import read_metrics
    from grpo.trainer import GRPOTrainer

    def lowercase(completions, **kwargs):
        return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in completions]

    lr, wd, clip, steps = 1e-3, 0.1, 0.05, 4
    args = tiny_args(tmp_path, use_lora=False, max_steps=steps, weight_decay=wd,
                     max_grad_norm=clip, learning_rate=lr, lr_scheduler_type="cosine",
                     per_device_train_batch_size=8, num_generations=4)  # fmt: skip
    trainer = GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS)
    seen = []
    compiled = trainer._train_step

    def observed(state, window):
        seen.append((state.params, window))
        return compiled(state, window)

    trainer._train_step = observed
    trainer.train()
    params0, window0 = seen[0]
    params1 = flat_numpy(seen[1][0])
    (_, _), grads = mx.value_and_grad(trainer._loss_fn)(params0, tree_map(
        lambda x: None if x is None else x[0], window0,
        is_leaf=lambda x: x is None or isinstance(x, mx.array)))  # fmt: skip
    grads, norm = torch_clip_grad_norm(flat_numpy(grads), clip)
    assert norm > clip  # clipping took part
    p0 = flat_numpy(params0)
    names = decay_parameter_names(trainer.model)
    assert any("norm" in n for n in p0) and not any("norm" in n for n in names)
    for n, p in p0.items():
        want = torch_adamw(p, grads[n], {}, t=1, lr=lr, b1=0.9, b2=0.999, eps=1e-8,
                           wd=wd if hf_decays(n) else 0.0)  # fmt: skip
        np.testing.assert_allclose(params1[n], want, rtol=1e-5, atol=1e-3 * lr, err_msg=n)
    logged = [r["learning_rate"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    want_lrs = lr * hf_lr_factors("cosine", steps, warmup=0, total=steps)
    np.testing.assert_allclose(logged, want_lrs, rtol=1e-6, atol=1e-12)
