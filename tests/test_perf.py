"""Speed features must not change the maths: block-causal attention and gradient checkpointing."""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from grpo.config import GRPOConfig
from grpo.core.batch import LossBatch, pack
from grpo.core.loss import grpo_loss
from grpo.io.fast_attention import block_causal_attention, install_fast_kernels
from grpo.io.model import prepare_policy


def _numpy_causal_attention(q, k, v, scale):
    # Independent reference: explicit masked softmax in float64.
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    L = q.shape[2]
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v)


@settings(max_examples=15)
@given(
    L=st.integers(1, 40),
    block=st.integers(1, 48),
    heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
    seed=st.integers(0, 2**16),
)
def test_block_causal_attention_matches_numpy(L, block, heads, seed):
    Hq, Hkv = heads
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((2, Hq, L, 8), key=k1)
    k = mx.random.normal((2, Hkv, L, 8), key=k2)
    v = mx.random.normal((2, Hkv, L, 8), key=k3)
    out = block_causal_attention(q, k, v, scale=0.35, block=block)
    np.testing.assert_allclose(np.array(out), _numpy_causal_attention(q, k, v, 0.35), atol=2e-5)


def test_block_causal_attention_gradients_match_full():
    k1, k2, k3 = mx.random.split(mx.random.key(0), 3)
    q, k, v = (mx.random.normal((1, 2, 37, 8), key=kk) for kk in (k1, k2, k3))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) ** 2).sum()

    full = mx.grad(
        loss(
            lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal")
        ),
        argnums=(0, 1, 2),
    )(q, k, v)
    blocked = mx.grad(
        loss(lambda q, k, v: block_causal_attention(q, k, v, scale=0.3, block=8)), argnums=(0, 1, 2)
    )(q, k, v)
    for a, b in zip(full, blocked, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_block_causal_attention_rejects_bad_arguments():
    x = mx.zeros((1, 1, 4, 2))
    with pytest.raises(ValueError, match="block"):
        block_causal_attention(x, x, x, scale=1.0, block=0)
    with pytest.raises(ValueError, match="keys"):
        block_causal_attention(x, x[:, :, :2], x[:, :, :2], scale=1.0, block=2)


def test_installed_model_forward_and_decoding_are_unchanged(tiny_model_dir):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    x = mx.random.randint(3, 60, (2, 50), key=mx.random.key(1))
    install_fast_kernels(model, enabled=False)
    plain = model(x)
    assert install_fast_kernels(model, block=8)
    blocked = model(x)
    np.testing.assert_allclose(np.array(blocked), np.array(plain), atol=1e-5)
    # With a KV cache (decoding) the kernels must match mlx-lm's function too.
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    step = model(x[:, :10], cache=cache)
    install_fast_kernels(model, enabled=False)
    cache2 = make_prompt_cache(model)
    np.testing.assert_allclose(np.array(step), np.array(model(x[:, :10], cache=cache2)), atol=1e-5)
    install_fast_kernels(model)  # back to the default other tests expect


def test_quantized_kv_cache_keeps_mlx_lm_attention(tiny_model_dir):
    from mlx_lm.models.cache import QuantizedKVCache

    model, _ = mlx_lm.load(str(tiny_model_dir))
    x = mx.random.randint(3, 60, (1, 70), key=mx.random.key(2))

    def run():
        cache = [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]
        return np.array(model(x, cache=cache))

    install_fast_kernels(model, enabled=False)
    plain = run()
    assert install_fast_kernels(model)
    np.testing.assert_allclose(run(), plain, atol=1e-5)


def _loss_and_grads(model_dir, *, checkpointing: bool, use_lora: bool):
    model, _ = mlx_lm.load(str(model_dir))
    cfg = GRPOConfig(use_lora=use_lora, gradient_checkpointing=checkpointing, beta=0.0)
    policy = prepare_policy(model, cfg, key=mx.random.key(0))
    N, P, T = 4, 6, 12
    prompt = mx.random.randint(3, 60, (N, P), key=mx.random.key(2))
    completion = mx.random.randint(3, 60, (N, T), key=mx.random.key(3))
    lengths = mx.full((N,), P, dtype=mx.int32)
    batch = LossBatch(
        input_ids=pack(prompt, lengths, completion),
        completion_start=lengths,
        completion_ids=completion,
        completion_mask=mx.ones((N, T)),
        advantages=mx.array([1.0, -1.0, 0.5, -0.5]),
    )
    model.train()
    fn = mx.value_and_grad(
        lambda p: grpo_loss(p, None, batch, model=model, cfg=cfg.to_loss_config())[0]
    )
    loss, grads = fn(policy.params)
    mx.eval(loss, grads)
    return loss, dict(tree_flatten(grads)), model


@pytest.mark.parametrize("use_lora", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, use_lora):
    loss0, g0, _ = _loss_and_grads(tiny_model_dir, checkpointing=False, use_lora=use_lora)
    loss1, g1, model = _loss_and_grads(tiny_model_dir, checkpointing=True, use_lora=use_lora)
    assert all(type(layer).__name__.startswith("Checkpointed") for layer in model.layers)
    np.testing.assert_allclose(loss1.item(), loss0.item(), rtol=1e-5, atol=1e-7)
    assert g0.keys() == g1.keys()
    for name in g0:
        np.testing.assert_allclose(np.array(g1[name]), np.array(g0[name]), atol=1e-6, err_msg=name)


def test_gradient_checkpointing_is_a_config_field_off_by_default():
    assert GRPOConfig().gradient_checkpointing is False
    assert attrs.evolve(GRPOConfig(), gradient_checkpointing=True).to_dict()[
        "gradient_checkpointing"
    ]


def test_chunked_log_prob_backward_stays_below_a_float32_copy(peak_extra_bytes):
    from grpo.core.logprobs import token_logprobs_and_entropy

    B, T, V = 2, 64, 32768
    f32_bytes = B * T * V * 4
    logits = (mx.random.normal((B, T, V), key=mx.random.key(0)) * 3).astype(mx.bfloat16)
    tokens = mx.random.randint(0, V, (B, T), key=mx.random.key(1))
    mx.eval(logits, tokens)

    def grad(chunk):
        def loss(x):
            lp, ent = token_logprobs_and_entropy(
                x, tokens, temperature=0.7, max_chunk_elements=chunk
            )
            return lp.sum() + 0.1 * ent.sum()

        return lambda: mx.grad(loss)(logits)

    chunked = peak_extra_bytes(grad(1 << 16))
    unchunked = peak_extra_bytes(grad(1 << 30))
    # The unchunked backward holds float32 [B, T, V] temporaries; the chunked one holds the
    # bf16 gradient (half a float32 copy), its parts, and one chunk's temporaries.
    assert unchunked >= 2 * f32_bytes, (unchunked, f32_bytes)
    assert chunked < 1.5 * f32_bytes, (chunked, f32_bytes)
