"""Model-level loss: packing, completion log-probs, grpo_loss on the tiny model, LoRA reference."""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.utils import linear_to_lora_layers
from reference_numpy import np_entropy, np_log_softmax

from grpo.core.batch import LossBatch, pack
from grpo.core.loss import (
    LossConfig,
    completion_logprobs,
    grpo_loss,
    lora_reference_params,
    make_policy_loss,
)

# ------------------------------------------------------------------ pack


def test_pack_hand_case():
    prompts = mx.array([[5, 6, 7], [8, 0, 0]])
    completions = mx.array([[1, 2], [3, 4]])
    out = pack(prompts, mx.array([3, 1]), completions, pad_id=9)
    assert np.array(out).tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 9]]


@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_pack_matches_python_concatenation(N, P, T, seed):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, 50, (N, P))
    lengths = rng.integers(1, P + 1, N)
    completions = rng.integers(1, 50, (N, T))
    out = np.array(pack(mx.array(prompts), mx.array(lengths), mx.array(completions)))
    for i in range(N):
        row = list(prompts[i, : lengths[i]]) + list(completions[i])
        assert out[i].tolist() == row + [0] * (P + T - len(row))


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        pack(mx.zeros((2, 3), mx.int32), mx.ones(3, mx.int32), mx.zeros((2, 2), mx.int32))


# ------------------------------------------------------------ fixtures


@pytest.fixture
def model(tiny_model):
    """The session's tiny model, with its weights restored after the test."""
    m = tiny_model[0]
    saved = tree_map(lambda x: x, m.parameters())
    yield m
    m.update(saved)


def _batch(V, *, seed=0, N=4, P=5, T=6, **fields):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, V, (N, P))
    lengths = np.array([5, 2, 1, 3][:N])
    completions = rng.integers(3, V, (N, T))
    completion_lengths = np.array([6, 4, 1, 5][:N])
    mask = (np.arange(T)[None, :] < completion_lengths[:, None]).astype(np.float32)
    ids = pack(mx.array(prompts), mx.array(lengths), mx.array(completions))
    batch = LossBatch(
        input_ids=ids,
        completion_start=mx.array(lengths, dtype=mx.int32),
        completion_ids=mx.array(completions),
        completion_mask=mx.array(mask),
        advantages=mx.array(rng.normal(size=N), dtype=mx.float32),
    )
    return batch._replace(**fields)


def _naive(model, batch, temperature=1.0):
    # Full-sequence forward, then log_softmax and gather at each completion position (NumPy).
    logits = np.array(model(batch.input_ids).astype(mx.float32))
    starts = np.array(batch.completion_start)
    comp = np.array(batch.completion_ids)
    N, T = comp.shape
    logp = np.zeros((N, T))
    ent = np.zeros((N, T))
    for i in range(N):
        z = logits[i, starts[i] - 1 : starts[i] - 1 + T]
        logp[i] = np_log_softmax(z, temperature)[np.arange(T), comp[i]]
        ent[i] = np_entropy(z, temperature)
    return logp, ent


def _vocab(model):
    return model.args.vocab_size


# ------------------------------------------------------- completion_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_equal_naive_forward(model, temperature):
    batch = _batch(_vocab(model))
    params = model.parameters()
    logp, ent = completion_logprobs(
        model, params, batch, temperature=temperature, with_entropy=True
    )
    ref_logp, ref_ent = _naive(model, batch, temperature)
    np.testing.assert_allclose(np.array(logp), ref_logp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(ent), ref_ent, rtol=1e-4, atol=1e-4)
    only = completion_logprobs(model, params, batch, temperature=temperature)
    np.testing.assert_allclose(np.array(only), np.array(logp), atol=1e-6)


def test_right_padding_needs_no_attention_mask(model):
    # Batched (ragged, right-padded) rows equal each row run alone without any padding.
    batch = _batch(_vocab(model), seed=3)
    logp = np.array(completion_logprobs(model, model.parameters(), batch))
    ids = np.array(batch.input_ids)
    T = batch.completion_ids.shape[1]
    for i, start in enumerate(np.array(batch.completion_start)):
        alone = batch._replace(
            input_ids=mx.array(ids[i : i + 1, : start + T]),
            completion_start=batch.completion_start[i : i + 1],
            completion_ids=batch.completion_ids[i : i + 1],
        )
        single = np.array(completion_logprobs(model, model.parameters(), alone))
        np.testing.assert_allclose(logp[i], single[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- grpo_loss


def _grads(model, cfg, batch, ref_params=None):
    params = model.trainable_parameters()

    def f(p):
        return grpo_loss(p, ref_params, batch, model=model, cfg=cfg)

    (loss, metrics), grads = mx.value_and_grad(f)(params)
    return loss, metrics, [g for _, g in tree_flatten(grads)]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo", "sapo", "vespo"])
def test_grpo_loss_finite_with_nonzero_gradient(model, loss_type):
    cfg = LossConfig(loss_type=loss_type, beta=0.04, epsilon_high=0.28, max_completion_length=6)
    batch = _batch(_vocab(model))
    ref = tree_map(lambda x: x + 0.01, model.trainable_parameters())
    loss, metrics, grads = _grads(model, cfg, batch, ref_params=ref)
    assert np.isfinite(loss.item())
    assert all(np.isfinite(v.item()) for v in metrics.values())
    assert metrics["kl"].item() > 0 and "entropy" in metrics
    assert all(np.isfinite(np.array(g)).all() for g in grads)
    assert sum(float(mx.abs(g).sum().item()) for g in grads) > 0


def test_uniform_advantages_give_zero_gradient(model):
    # Zero-std groups have advantage 0 everywhere: with beta = 0 nothing trains.
    batch = _batch(_vocab(model), advantages=mx.zeros(4))
    loss, _, grads = _grads(model, LossConfig(loss_type="grpo"), batch)
    assert loss.item() == 0.0
    assert all(float(mx.abs(g).max().item()) == 0.0 for g in grads)


def test_grpo_loss_is_policy_loss_of_the_naive_logprobs(model):
    cfg = LossConfig(loss_type="bnpo", beta=0.1, epsilon_high=0.28, temperature=0.8)
    base = _batch(_vocab(model), seed=5)
    logp, ent = _naive(model, base, 0.8)
    rng = np.random.default_rng(0)
    old = mx.array((logp + rng.uniform(-0.3, 0.3, logp.shape)).astype(np.float32))
    ref = mx.array((logp + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32))
    batch = base._replace(old_logprobs=old, ref_logprobs=ref)
    loss, metrics = grpo_loss(model.parameters(), None, batch, model=model, cfg=cfg)
    expected, expected_metrics = make_policy_loss(cfg)(
        mx.array(logp, dtype=mx.float32),
        batch.advantages,
        batch.completion_mask,
        old_logprobs=old,
        ref_logprobs=ref,
        entropies=mx.array(ent, dtype=mx.float32),
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    for k, v in expected_metrics.items():
        assert metrics[k].item() == pytest.approx(v.item(), rel=1e-4, abs=1e-5), k


def test_reference_rule(model):
    cfg = LossConfig(loss_type="grpo", beta=0.2, temperature=0.7)
    batch = _batch(_vocab(model), seed=2)
    params = model.parameters()
    ref_params = tree_map(lambda x: x * 1.05, params)
    ref_logp = completion_logprobs(model, ref_params, batch, temperature=0.7)
    via_params, m1 = grpo_loss(params, ref_params, batch, model=model, cfg=cfg)
    via_batch, m2 = grpo_loss(
        params, None, batch._replace(ref_logprobs=ref_logp), model=model, cfg=cfg
    )
    assert via_params.item() == pytest.approx(via_batch.item(), rel=1e-5)
    assert m1["kl"].item() == pytest.approx(m2["kl"].item(), rel=1e-5) and m1["kl"].item() > 0
    # beta > 0 and no reference at all is an error, as in policy_loss (never a silent beta=0).
    with pytest.raises(ValueError, match="needs a reference"):
        grpo_loss(params, None, batch, model=model, cfg=cfg)
    with pytest.raises(ValueError, match="exactly one reference"):
        grpo_loss(params, ref_params, batch._replace(ref_logprobs=ref_logp), model=model, cfg=cfg)


def test_compiled_grpo_loss_equals_eager(model):
    cfg = LossConfig(loss_type="dapo", beta=0.05, epsilon_high=0.28)
    batch = _batch(_vocab(model), seed=4)
    params = model.parameters()
    ref = tree_map(lambda x: x * 0.98, params)
    batch = batch._replace(ref_logprobs=completion_logprobs(model, ref, batch))
    traces = []

    def f(p, b):
        traces.append(1)
        return grpo_loss(p, None, b, model=model, cfg=cfg)

    (l1, _), g1 = mx.value_and_grad(f)(params, batch)
    step = mx.compile(mx.value_and_grad(f))
    (l2, _), g2 = step(params, batch)
    (l3, _), _ = step(params, batch._replace(advantages=batch.advantages * 2))
    model.update(params)  # compile leaves tracer arrays in the module
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5, abs=1e-6)
    assert len(traces) == 2  # one eager call + one trace for both compiled calls
    for (_, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ LoRA


def test_lora_reference_is_the_base_model(tiny_model_dir):
    base, _ = mlx_lm.load(str(tiny_model_dir))
    lora, _ = mlx_lm.load(str(tiny_model_dir))
    lora.freeze()
    linear_to_lora_layers(lora, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    key = mx.random.key(7)
    adapters = tree_map(
        lambda x: mx.random.normal(x.shape, key=key) * 0.05, lora.trainable_parameters()
    )
    batch = _batch(base.args.vocab_size, seed=6)
    want = np.array(completion_logprobs(base, base.parameters(), batch))
    adapted = np.array(completion_logprobs(lora, adapters, batch))
    ref_tree = lora_reference_params(adapters)
    got = np.array(completion_logprobs(lora, ref_tree, batch))
    assert np.abs(adapted - want).max() > 1e-3  # the adapters do change the policy
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Only adapter leaves are in the reference tree: the base weights are not copied.
    assert all(p.endswith(("lora_a", "lora_b")) for p, _ in tree_flatten(ref_tree))
    # grpo_loss with that reference: KL > 0 and a finite gradient for the adapters only.
    cfg = LossConfig(loss_type="grpo", beta=0.1)

    def f(p):
        return grpo_loss(p, ref_tree, batch, model=lora, cfg=cfg)

    (loss, metrics), grads = mx.value_and_grad(f)(adapters)
    assert np.isfinite(loss.item()) and metrics["kl"].item() > 0
    assert {p for p, _ in tree_flatten(grads)} == {p for p, _ in tree_flatten(adapters)}


def test_lora_reference_rejects_non_lora_trees(model):
    with pytest.raises(ValueError, match="lora_b"):
        lora_reference_params(model.parameters())
    with pytest.raises(ValueError, match="DoRA"):
        lora_reference_params(
            {"q": {"lora_a": mx.zeros(2), "lora_b": mx.zeros(2), "m": mx.ones(2)}}
        )
