"""Degenerate batches never produce NaN/inf, and a non-finite step never reaches the weights.

The batches are hypothesis-generated and go through the real pipeline pieces the trainer
uses: rewards -> :func:`grpo.core.advantages.make_advantages` -> :func:`grpo.core.batch.pack`
-> :class:`LossBatch` -> :func:`grpo.core.step.make_train_step` over
:func:`grpo.core.loss.grpo_loss` on the tiny model (float32, float16 and bfloat16 weights).
"""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from grpo.config import LOSS_TYPES, GRPOConfig
from grpo.core.advantages import make_advantages
from grpo.core.batch import LossBatch, pack
from grpo.core.loss import completion_logprobs, grpo_loss
from grpo.core.state import init_state
from grpo.core.optim import make_optimizer
from grpo.core.step import make_train_step
from grpo.trainer import GRPOTrainer, NonFiniteError
from helpers import PROMPTS, flat_numpy, tiny_args

B, G, P, T = 2, 4, 3, 5
N = B * G
EOS = 2  # the tiny tokenizer's EOS id

# -- strategies ----------------------------------------------------------------------------

COMPLETIONS = ("empty", "truncated", "mixed")
REWARDS = ("uniform", "spike_1e9", "huge_all", "mixed")


@st.composite
def rewards_of(draw, kind):
    """``[N, 1]`` float32 rewards of one degenerate kind."""
    if kind == "uniform":
        return np.full((N, 1), draw(st.sampled_from([0.0, 1.0, -3.5, 1e9])), np.float32)
    base = np.array(draw(st.lists(st.floats(-2, 2, width=32), min_size=N, max_size=N)), np.float32)[
        :, None
    ]
    if kind == "spike_1e9":
        base[draw(st.integers(0, N - 1)), 0] = 1e9
    elif kind == "huge_all":
        base = base * np.float32(1e9)
    elif kind == "mixed":
        base[draw(st.integers(0, N - 1)), 0] = np.nan  # a reward function returned None
    return base


@st.composite
def completions_of(draw, kind):
    """``(completion_ids [N, T], mask [N, T], is_truncated [N])`` as the rollout emits them."""
    ids = np.array(draw(st.lists(st.integers(3, 127), min_size=N * T, max_size=N * T)))
    ids = ids.reshape(N, T).astype(np.int32)
    if kind == "empty":  # EOS first: one live token, the EOS itself
        lengths = np.ones(N, np.int32)
    elif kind == "truncated":  # no EOS within max_completion_length
        lengths = np.full(N, T, np.int32)
    else:
        lengths = np.array(draw(st.lists(st.integers(1, T), min_size=N, max_size=N)), np.int32)
    truncated = lengths == T
    if kind == "truncated":
        truncated[:] = True
    for i, n in enumerate(lengths):
        if not truncated[i]:
            ids[i, n - 1] = EOS
        ids[i, n:] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    return ids, mask, truncated


@st.composite
def scenarios(draw):
    reward_kind = draw(st.sampled_from(REWARDS))
    completion_kind = draw(st.sampled_from(COMPLETIONS))
    return dict(
        rewards=draw(rewards_of(reward_kind)),
        completions=draw(completions_of(completion_kind)),
        prompt_lengths=np.array(draw(st.lists(st.integers(1, P), min_size=B, max_size=B))),
        loss_type=draw(st.sampled_from(LOSS_TYPES)),
        scale_rewards=draw(st.sampled_from(["group", "batch", "none"])),
        beta=draw(st.sampled_from([0.0, 0.04])),
        mask_truncated=draw(st.booleans()),
        off_policy=draw(st.booleans()),
        kind=(reward_kind, completion_kind),
    )


# -- the real pipeline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model):
    m = tiny_model[0]
    saved = tree_map(lambda x: x, m.parameters())
    yield m
    m.update(saved)


def _cast(model, dtype):
    model.update(tree_map(lambda x: x.astype(dtype), model.parameters()))


def _batch(s, model) -> LossBatch:
    ids, mask, truncated = s["completions"]
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 128, (B, P)).repeat(G, axis=0)
    lengths = s["prompt_lengths"].repeat(G)
    if s["mask_truncated"]:
        mask = mask * ~truncated[:, None]
    adv_fn = make_advantages(group_size=G, scale=s["scale_rewards"])
    adv = adv_fn(mx.array(s["rewards"]), mx.ones((1,), mx.float32))
    batch = LossBatch(
        input_ids=pack(mx.array(prompts), mx.array(lengths), mx.array(ids)),
        completion_start=mx.array(lengths, dtype=mx.int32),
        completion_ids=mx.array(ids),
        completion_mask=mx.array(mask),
        advantages=adv.advantages.astype(mx.float32),
    )
    logp = mx.stop_gradient(completion_logprobs(model, model.parameters(), batch))
    if s["beta"]:
        batch = batch._replace(ref_logprobs=logp + 0.3)
    if s["off_policy"]:  # a stale sampler: ratios far from 1, both clip regions hit
        noise = mx.array(np.random.default_rng(1).normal(0, 2.0, (N, T)), mx.float32)
        batch = batch._replace(old_logprobs=logp + noise)
    return batch


def _all_finite(tree) -> bool:
    return all(
        bool(mx.all(mx.isfinite(v.astype(mx.float32))).item()) for _, v in tree_flatten(tree)
    )


def _one_step(model, s):
    cfg = GRPOConfig(
        loss_type=s["loss_type"],
        beta=s["beta"],
        num_generations=G,
        per_device_train_batch_size=N,
        max_completion_length=T,
        learning_rate=1e-3,
        use_lora=False,
    )
    batch = _batch(s, model)
    assert np.isfinite(np.array(batch.advantages)).all(), s["kind"]
    params = model.trainable_parameters()
    optimizer = make_optimizer(cfg, total_steps=10)
    state = init_state(params, optimizer, key=mx.random.key(0))
    loss_cfg = cfg.to_loss_config()

    def loss_fn(p, b):
        return grpo_loss(p, None, b, model=model, cfg=loss_cfg)

    step = make_train_step(loss_fn, optimizer, **cfg.train_step_kwargs(), compile=False)
    stacked = LossBatch(*(None if x is None else x[None] for x in batch))
    new_state, metrics = step(state, stacked)
    mx.eval(new_state, metrics)
    model.update(params)
    return new_state, metrics


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@settings(max_examples=12)
@given(s=scenarios())
def test_degenerate_batches_give_finite_loss_gradients_and_weights(model, dtype, s):
    saved = tree_map(lambda x: x, model.parameters())
    try:
        _cast(model, dtype)
        state, metrics = _one_step(model, s)
        where = (str(dtype), s["kind"], s["loss_type"], s["scale_rewards"], s["beta"])
        finite = math.isfinite(metrics["loss"].item()) and math.isfinite(
            metrics["grad_norm"].item()
        )
        if not finite:
            # The one documented limit: unnormalised (scale_rewards="none") rewards of 1e9
            # make the float16 backward pass overflow (float16 max 65504). The trainer's guard
            # sees exactly these two metrics and stops the run (test below).
            huge = np.nanmax(np.abs(s["rewards"])) >= 1e4
            assert dtype == mx.float16 and s["scale_rewards"] == "none" and huge, where
            return
        assert _all_finite(state.params), where
        assert _all_finite(state.opt_state), where
        for name in ("kl", "entropy"):
            if name in metrics:
                assert math.isfinite(metrics[name].item()), (name, where)
    finally:
        model.update(saved)


@given(s=scenarios())
@settings(max_examples=10)
def test_fully_masked_batches_do_not_move_the_weights(model, s):
    # All-truncated completions with mask_truncated_completions leave no live token: loss 0,
    # gradient 0, and (with no weight decay) the weights stay exactly where they were.
    ids, mask, truncated = s["completions"]
    s = {**s, "completions": (ids, mask, np.ones(N, bool)), "mask_truncated": True}
    before = flat_numpy(model.trainable_parameters())
    state, metrics = _one_step(model, s)
    assert metrics["loss"].item() == 0.0
    assert metrics["grad_norm"].item() == 0.0
    for k, v in tree_flatten(state.params):
        np.testing.assert_array_equal(np.array(v), before[k], err_msg=k)


# -- the trainer's guard -------------------------------------------------------------------


def _trainer(model_dir, tmp_path, reward, **kw):
    args = tiny_args(tmp_path, **{"save_steps": 2, **kw})
    return GRPOTrainer(str(model_dir), reward, args=args, train_dataset=PROMPTS, group=None)


class _Snapshots:
    def __init__(self):
        self.params = {}

    def on_step_end(self, trainer, step, metrics):
        self.params[step] = flat_numpy(trainer.state.params)


def _assert_params(trainer, want):
    got = flat_numpy(trainer.state.params)
    assert got.keys() == want.keys()
    model_params = dict(tree_flatten(trainer.model.trainable_parameters()))
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        # The model object the user holds carries the last good weights too.
        np.testing.assert_array_equal(np.array(model_params[k]), want[k], err_msg=k)
        assert np.isfinite(got[k]).all()


def _lengths(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_nan_advantages_stop_the_run_naming_step_and_metric(tiny_model_dir, tmp_path):
    # Poison the real advantages of the third generation batch (one NaN row), as a broken
    # reward pipeline would; the loss of step 3 is NaN and must never reach the weights.
    snaps = _Snapshots()
    trainer = _trainer(tiny_model_dir, tmp_path, _lengths)
    trainer.callbacks.append(snaps)
    real, calls = trainer._advantages, [0]

    def poisoned(rewards_per_func, weights):
        calls[0] += 1
        adv = real(rewards_per_func, weights)
        if calls[0] < 3:
            return adv
        row0 = mx.arange(adv.advantages.shape[0]) == 0
        return adv._replace(advantages=mx.where(row0, mx.nan, adv.advantages))

    trainer._advantages = poisoned
    with pytest.raises(NonFiniteError, match=r"non-finite loss=nan at step 3"):
        trainer.train()
    assert trainer.global_step == 2
    _assert_params(trainer, snaps.params[2])
    # The checkpoint written at step 2 is intact and equals the last good weights.
    saved = mx.load(str(tmp_path / "checkpoint-2" / "adapters.safetensors"))
    for k, v in saved.items():
        np.testing.assert_array_equal(np.array(v), snaps.params[2][k], err_msg=k)
    assert not (tmp_path / "checkpoint-3").exists()


def test_infinite_reward_is_rejected_before_the_update(tiny_model_dir, tmp_path):
    calls = [0]

    def inf_on_call_3(completions, **kwargs):
        calls[0] += 1
        bad = float("inf") if calls[0] >= 3 else 0.0
        return [bad if i == 0 else float(len(c)) for i, c in enumerate(completions)]

    snaps = _Snapshots()
    trainer = _trainer(tiny_model_dir, tmp_path, inf_on_call_3)
    trainer.callbacks.append(snaps)
    with pytest.raises(ValueError, match=r"'inf_on_call_3' returned inf at row 0"):
        trainer.train()
    assert trainer.global_step == 2
    _assert_params(trainer, snaps.params[2])


def test_nan_weight_stops_the_run_at_the_next_step(tiny_model_dir, tmp_path):
    # A NaN written into one trainable weight after step 1 (as a bad external update would):
    # the next step's loss or gradient is non-finite and the run stops there.
    class Poison:
        def on_step_end(self, trainer, step, metrics):
            if step == 1:
                flat = tree_flatten(trainer.state.params)
                name, value = flat[0]
                bad = mx.where(mx.arange(value.size).reshape(value.shape) == 0, mx.nan, value)
                params = tree_unflatten([(k, bad if k == name else v) for k, v in flat])
                trainer.train_state = trainer.train_state._replace(params=params)
                trainer.model.update(params)

    trainer = _trainer(tiny_model_dir, tmp_path, _lengths, use_lora=False)
    trainer.callbacks.append(Poison())
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|grad_norm)=nan at step 2"):
        trainer.train()
    assert trainer.global_step == 1
