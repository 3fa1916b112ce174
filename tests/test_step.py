"""The compiled optimisation step: schedules, accumulation weights, clipping, purity, traces."""

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import flat_numpy
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten

import grpo  # noqa: F401
from grpo.config import GRPOConfig
from grpo.core.optim import make_optimizer, make_schedule
from grpo.core.state import TrainState, init_state
from grpo.core.step import (
    bucket_length,
    clip_by_global_norm,
    make_train_step,
    per_sequence_weights,
    per_token_weights,
)


class Toy(NamedTuple):
    x: mx.array  # [K, n, T, D]
    mask: mx.array  # [K, n, T]


def _cfg(**kw):
    base = dict(per_device_train_batch_size=4, num_generations=2, learning_rate=0.05)
    return GRPOConfig(**{**base, **kw})


def _toy_loss(model, *, per_token, counter=None):
    def loss_fn(params, mb):
        if counter is not None:
            counter[0] += 1
        model.update(params)
        y = model(mb.x)[..., 0]  # [n, T]
        per_tok = (y - 1.0) ** 2
        m = mb.mask
        if per_token:
            loss = (per_tok * m).sum() / mx.maximum(m.sum(), 1.0)
        else:
            loss = ((per_tok * m).sum(-1) / mx.maximum(m.sum(-1), 1.0)).mean()
        return loss, {"y": (y * m).sum() / mx.maximum(m.sum(), 1.0)}

    return loss_fn


def _setup(cfg, *, seed=0, D=3, per_token=True, counter=None, compile=True):
    mx.random.seed(seed)  # test-only: seeds nn.Linear's init
    model = nn.Linear(D, 1)
    params = model.trainable_parameters()
    opt = make_optimizer(cfg, total_steps=10)
    state = init_state(params, opt, key=mx.random.key(seed))
    step = make_train_step(
        _toy_loss(model, per_token=per_token, counter=counter),
        opt,
        **cfg.train_step_kwargs(),
        rebind=model,
        compile=compile,
    )
    return state, step


def _data(K, n, T, D=3, seed=1, ragged=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(K, n, T, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=(K, n)) if ragged else np.full((K, n), T)
    if ragged:
        lengths[0, :] = T  # micro-batch 0 has many more tokens than the others
        lengths[1:, :] = 1
    mask = (np.arange(T)[None, None, :] < lengths[..., None]).astype(np.float32)
    return x, mask


# -- schedules ---------------------------------------------------------------------------


def _hf_lr(kind, step, *, lr, warmup, total):
    # transformers' get_*_schedule_with_warmup lambdas, in NumPy.
    if step < warmup:
        return lr * step / max(1, warmup)
    if kind.startswith("constant"):
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return lr * max(0.0, 1.0 - progress)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_transformers(kind, warmup):
    total, lr = 12, 2e-3
    sched = make_schedule(
        learning_rate=lr, scheduler_type=kind, warmup_steps=warmup, total_steps=total
    )
    got = [sched(mx.array(s, mx.uint64)).item() for s in range(total + 2)]
    want = [_hf_lr(kind, s, lr=lr, warmup=warmup, total=total) for s in range(total + 2)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_constant_schedule_ignores_warmup():
    sched = make_schedule(
        learning_rate=0.1, scheduler_type="constant", warmup_steps=5, total_steps=9
    )
    assert all(abs(sched(mx.array(s, mx.uint64)).item() - 0.1) < 1e-7 for s in range(9))


def test_optimizer_lr_metric_follows_schedule():
    cfg = _cfg(lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=0.0)
    state, step = _setup(cfg)
    x, m = _data(1, 4, 5)
    lrs = []
    for _ in range(4):
        state, metrics = step(state, Toy(mx.array(x), mx.array(m)))
        lrs.append(metrics["learning_rate"].item())
    want = [_hf_lr("linear", s, lr=0.05, warmup=2, total=10) for s in range(4)]
    np.testing.assert_allclose(lrs, want, rtol=1e-6, atol=1e-9)
    assert state.step.item() == 4 and state.opt_state["step"].item() == 4


# -- accumulation ------------------------------------------------------------------------


def test_accumulation_weights_hand_computed():
    masks = mx.array(np.array([[[1, 1, 1], [1, 0, 0]], [[1, 0, 0], [0, 0, 0]]], np.float32))
    np.testing.assert_allclose(np.array(per_token_weights(masks)), [4 / 5, 1 / 5])
    np.testing.assert_allclose(np.array(per_sequence_weights(masks)), [0.5, 0.5])
    np.testing.assert_array_equal(np.array(per_token_weights(mx.zeros((2, 2, 3)))), [0, 0])


@pytest.mark.parametrize("per_token,loss_type", [(True, "dapo"), (True, "bnpo"), (False, "grpo")])
def test_accumulated_step_equals_big_batch_step(per_token, loss_type):
    """K micro-batches weighted by the loss normaliser == one step on the whole batch."""
    K, n, T = 3, 2, 6
    x, m = _data(K, n, T)
    big_cfg = _cfg(loss_type=loss_type, per_device_train_batch_size=K * n, max_grad_norm=0.0)
    acc_cfg = _cfg(
        loss_type=loss_type,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=K,
        max_grad_norm=0.0,
    )
    s_big, step_big = _setup(big_cfg, per_token=per_token)
    s_acc, step_acc = _setup(acc_cfg, per_token=per_token)
    big = Toy(mx.array(x.reshape(1, K * n, T, -1)), mx.array(m.reshape(1, K * n, T)))
    s_big, m_big = step_big(s_big, big)
    s_acc, m_acc = step_acc(s_acc, Toy(mx.array(x), mx.array(m)))
    np.testing.assert_allclose(m_acc["loss"].item(), m_big["loss"].item(), rtol=1e-5)
    np.testing.assert_allclose(m_acc["grad_norm"].item(), m_big["grad_norm"].item(), rtol=1e-5)
    for k, v in flat_numpy(s_big.params).items():
        np.testing.assert_allclose(flat_numpy(s_acc.params)[k], v, rtol=1e-5, atol=1e-7)


def test_naive_mean_over_micro_batches_would_differ():
    """Guard that the equivalence test can fail: with ragged token counts a plain mean of
    micro-batch token-means differs from the big-batch token-mean."""
    x, m = _data(3, 2, 6)
    w = np.array([0.3, -0.2, 0.5], np.float32)
    per_tok = ((x @ w) - 1.0) ** 2
    micro = [(per_tok[k] * m[k]).sum() / m[k].sum() for k in range(3)]
    big = (per_tok * m).sum() / m.sum()
    assert abs(np.mean(micro) - big) > 1e-3
    weights = np.array(per_token_weights(mx.array(m)))
    np.testing.assert_allclose((weights * np.array(micro)).sum(), big, rtol=1e-5)


# -- clipping ----------------------------------------------------------------------------


def test_grad_norm_and_clipping_against_numpy():
    cfg = _cfg(optim="sgd", max_grad_norm=0.01, lr_scheduler_type="constant", learning_rate=1.0)
    state, step = _setup(cfg)
    x, m = _data(1, 4, 5, ragged=False)
    p0 = flat_numpy(state.params)
    # NumPy gradient of mean((x w + b - 1)^2)
    X, M = x[0], m[0]
    resid = X @ p0["weight"][0] + p0["bias"][0] - 1.0
    gw = 2 * (resid[..., None] * X * M[..., None]).sum((0, 1)) / M.sum()
    gb = 2 * (resid * M).sum() / M.sum()
    norm = np.sqrt((gw**2).sum() + gb**2)
    state, metrics = step(state, Toy(mx.array(x), mx.array(m)))
    np.testing.assert_allclose(metrics["grad_norm"].item(), norm, rtol=1e-5)
    p1 = flat_numpy(state.params)
    scale = 0.01 / (norm + 1e-6)
    np.testing.assert_allclose(p0["weight"][0] - p1["weight"][0], gw * scale, rtol=1e-4)
    np.testing.assert_allclose(p0["bias"][0] - p1["bias"][0], gb * scale, rtol=1e-4)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6])
def test_clip_by_global_norm_matches_mlx_clip_grad_norm(dtype, max_norm):
    rng = np.random.default_rng(0)
    tree = {
        "a": mx.array(rng.standard_normal((7, 5)) * 3, dtype=dtype),
        "b": [mx.array(rng.standard_normal(11), dtype=dtype), mx.array([2.0], dtype=dtype)],
    }
    got, norm = clip_by_global_norm(tree, max_norm)
    f64 = [np.array(x.astype(mx.float32), np.float64) for _, x in tree_flatten(tree)]
    want_norm = np.sqrt(sum((x**2).sum() for x in f64))
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    np.testing.assert_allclose(norm.item(), want_norm, rtol=tol)
    want, _ = optim.clip_grad_norm(tree, max_norm if max_norm > 0 else float("inf"))
    for (k, g), (_, w) in zip(tree_flatten(got), tree_flatten(want), strict=True):
        assert g.dtype == dtype, k
        np.testing.assert_allclose(
            np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32)), rtol=tol
        )


def test_global_norm_allocates_no_gradient_sized_temporary():
    g = {"w": mx.random.normal((1024, 1024)), "b": mx.random.normal((1024, 512))}
    mx.eval(g)
    size = sum(x.nbytes for _, x in tree_flatten(g))
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(clip_by_global_norm(g, 1.0)[1])
    assert mx.get_peak_memory() - base < size / 8, (mx.get_peak_memory() - base, size)


# -- purity and compile ------------------------------------------------------------------


def test_step_is_pure_and_compiled_equals_uncompiled():
    cfg = _cfg(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    x, m = _data(2, 2, 4)
    batch = Toy(mx.array(x), mx.array(m))
    s0, step_c = _setup(cfg)
    _, step_u = _setup(cfg, compile=False)
    before = flat_numpy(s0.params)
    s1, _ = step_c(s0, batch)
    s1b, _ = step_c(s0, batch)
    s1u, _ = step_u(s0, batch)
    assert flat_numpy(s0.params).keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(flat_numpy(s0.params)[k], v)  # input state untouched
        np.testing.assert_array_equal(flat_numpy(s1.params)[k], flat_numpy(s1b.params)[k])
        np.testing.assert_allclose(
            flat_numpy(s1.params)[k], flat_numpy(s1u.params)[k], rtol=1e-6, atol=1e-7
        )
    assert not np.array_equal(np.array(s1.key), np.array(s0.key))
    assert isinstance(s1, TrainState) and s1.step.item() == 1


def test_wrong_micro_batch_axis_is_rejected():
    cfg = _cfg(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    state, step = _setup(cfg, compile=False)
    x, m = _data(1, 2, 4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        step(state, Toy(mx.array(x), mx.array(m)))


def test_no_recompilation_after_warmup_across_lengths():
    """Bucketed lengths: every bucket traces once during warm-up, then never again."""
    cfg = _cfg(max_grad_norm=1.0)
    counter = [0]
    state, step = _setup(cfg, counter=counter)
    cap = 24
    buckets = sorted({bucket_length(t, cap=cap) for t in range(1, cap + 1)})
    rng = np.random.default_rng(0)

    def run(true_len, state):
        T = bucket_length(true_len, cap=cap)
        x, _ = _data(1, 4, T, seed=int(rng.integers(1 << 30)), ragged=False)
        mask = (np.arange(T) < true_len).astype(np.float32)[None, None, :].repeat(4, 1)
        return step(state, Toy(mx.array(x), mx.array(mask)))[0]

    for T in buckets:
        state = run(T, state)
    warm = counter[0]
    assert warm == len(buckets)
    for true_len in rng.integers(1, cap + 1, size=25):
        state = run(int(true_len), state)
    mx.eval(state.params)
    assert counter[0] == warm


@given(st.integers(1, 5000), st.sampled_from([None, 8, 32]), st.sampled_from([None, 64, 512]))
def test_bucket_length_properties(n, multiple, cap):
    b = bucket_length(n, multiple=multiple, cap=cap)
    assert b >= n
    if cap is not None and n <= cap:
        assert b <= cap
    if multiple is None and (cap is None or b < cap):
        assert b & (b - 1) == 0 and b < 2 * n
    if multiple is not None and (cap is None or b < cap):
        assert b % multiple == 0 and b - n < multiple
    assert bucket_length(b, multiple=multiple, cap=cap) == b  # idempotent


def test_make_optimizer_kinds():
    from grpo.core import optim as grpo_optim

    assert type(make_optimizer(_cfg(), total_steps=5)) is grpo_optim.AdamW
    assert type(make_optimizer(_cfg(optim="adam"), total_steps=5)) is grpo_optim.Adam
    assert isinstance(make_optimizer(_cfg(optim="sgd"), total_steps=5), optim.SGD)
    assert isinstance(make_optimizer(_cfg(optim="adafactor"), total_steps=5), optim.Adafactor)
