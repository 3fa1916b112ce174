"""The shared-prefix training forward equals the packed forward (values and gradients)."""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import grpo.core.rollout
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers

from grpo.config import GRPOConfig
from grpo.core import shared_prefix
from grpo.core.batch import LossBatch, pack
from grpo.core.loss import LossConfig, completion_logprobs, grpo_loss
from grpo.io.fast_attention import install_fast_kernels
from grpo.io.model import enable_gradient_checkpointing


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m, _ = mlx_lm.load(str(tiny_model_dir))
    return m


def _batch(lengths, G, P, T, seed):
    # B prompts of the given lengths, G rows each (group-contiguous), random completions.
    rng = np.random.default_rng(seed)
    N = len(lengths) * G
    prompts = np.zeros((N, P), np.int32)
    for b, n in enumerate(lengths):
        prompts[b * G : (b + 1) * G, :n] = rng.integers(3, 100, n)
    row_lengths = np.repeat(lengths, G).astype(np.int32)
    completions = mx.array(rng.integers(3, 100, (N, T)).astype(np.int32))
    ids = pack(mx.array(prompts), mx.array(row_lengths), completions)
    mask = mx.array((rng.random((N, T)) < 0.8).astype(np.float32))
    adv = mx.array(rng.normal(size=N).astype(np.float32))
    return LossBatch(ids, mx.array(row_lengths), completions, mask, adv)


def _flat(tree):
    return dict(tree_flatten(tree))


@settings(max_examples=8)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    G=st.sampled_from([2, 4]),
    T=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_logprobs_and_gradients_match_the_packed_forward(model, lengths, G, T, seed):
    batch = _batch(lengths, G, P=9, T=T, seed=seed)
    params = model.trainable_parameters()
    N = batch.completion_ids.shape[0]
    assert shared_prefix.can_share_prefix(model, N, G)
    w = mx.arange(T, dtype=mx.float32) - 1.5

    def objective(p, share):
        logp, ent = completion_logprobs(model, p, batch, with_entropy=True, prompt_share=share)
        return (logp * w).sum() + ent.sum()

    for share in sorted({2, G}):
        a = completion_logprobs(model, params, batch, prompt_share=1)
        b = completion_logprobs(model, params, batch, prompt_share=share)
        np.testing.assert_allclose(np.array(b), np.array(a), atol=2e-5)
        ga = _flat(mx.grad(objective)(params, 1))
        gb = _flat(mx.grad(objective)(params, share))
        for k in ga:
            np.testing.assert_allclose(np.array(gb[k]), np.array(ga[k]), atol=1e-4, rtol=1e-4)


def test_block_split_completion_attention_matches(model):
    # Completions longer than the attention block go through prefix_attention block by block.
    batch = _batch([6, 2, 9], G=2, P=9, T=11, seed=4)
    params = model.trainable_parameters()
    install_fast_kernels(llama, block=4)
    try:

        def objective(p, share):
            return (completion_logprobs(model, p, batch, prompt_share=share) ** 2).sum()

        a = completion_logprobs(model, params, batch, prompt_share=1)
        b = completion_logprobs(model, params, batch, prompt_share=2)
        ga, gb = _flat(mx.grad(objective)(params, 1)), _flat(mx.grad(objective)(params, 2))
    finally:
        install_fast_kernels(llama)
    np.testing.assert_allclose(np.array(b), np.array(a), atol=2e-5)
    for k in ga:
        np.testing.assert_allclose(np.array(gb[k]), np.array(ga[k]), atol=1e-4, rtol=1e-4)


def test_grpo_loss_with_lora_and_a_reference_matches(tiny_model_dir):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    # Non-zero adapters so the policy differs from the reference.
    params = tree_map(lambda x: x + 0.05, model.trainable_parameters())
    ref = tree_map(lambda x: x, params)
    batch = _batch([5, 3], G=4, P=6, T=5, seed=3)
    cfg = LossConfig(beta=0.04, loss_type="grpo")
    shared = LossConfig(beta=0.04, loss_type="grpo", prompt_share=4)

    def loss(p, c):
        return grpo_loss(p, ref, batch, model=model, cfg=c)[0]

    np.testing.assert_allclose(float(loss(params, shared)), float(loss(params, cfg)), atol=1e-6)
    ga, gb = _flat(mx.grad(loss)(params, cfg)), _flat(mx.grad(loss)(params, shared))
    for k in ga:
        np.testing.assert_allclose(np.array(gb[k]), np.array(ga[k]), atol=1e-5, rtol=1e-4)


def test_falls_back_where_it_cannot_share(tiny_model_dir, model):
    batch = _batch([4, 2], G=4, P=5, T=3, seed=1)
    assert not shared_prefix.can_share_prefix(model, 8, 1)
    assert not shared_prefix.can_share_prefix(model, 8, 3)  # 8 rows are not blocks of 3
    install_fast_kernels(llama, enabled=False)
    try:
        # mlx-lm's attention: no prefix caches
        assert not shared_prefix.can_share_prefix(model, 8, 4)
        plain = completion_logprobs(model, model.parameters(), batch, prompt_share=4)
    finally:
        install_fast_kernels(llama)
    np.testing.assert_allclose(
        np.array(completion_logprobs(model, model.parameters(), batch, prompt_share=4)),
        np.array(plain),
        atol=2e-5,
    )
    checkpointed, _ = mlx_lm.load(str(tiny_model_dir))
    enable_gradient_checkpointing(checkpointed)
    assert not shared_prefix.can_share_prefix(checkpointed, 8, 4)


def test_models_with_other_caches_keep_the_packed_forward(tiny_model_dir):
    from mlx_lm.models.cache import RotatingKVCache

    class SlidingModel(llama.Model):  # stands in for a sliding-window architecture
        def make_cache(self):
            return [RotatingKVCache(max_size=4) for _ in self.layers]

    SlidingModel.__module__ = llama.__name__  # same attention module, so kernels apply
    m = SlidingModel(mlx_lm.load(str(tiny_model_dir))[0].args)
    assert grpo.core.rollout.shares_prefix(m)
    assert not shared_prefix.can_share_prefix(m, 8, 4)


@pytest.mark.parametrize("micro, G, want", [(8, 8, 8), (4, 8, 4), (12, 8, 4), (6, 4, 2), (3, 8, 1)])
def test_config_prompt_share_is_the_gcd(micro, G, want):
    cfg = GRPOConfig(per_device_train_batch_size=micro, num_generations=G,
                     generation_batch_size=max(micro, G) * 2 * (micro // np.gcd(micro, G)))  # fmt: skip
    assert cfg.prompt_share == want
    assert cfg.to_loss_config().prompt_share == want


def test_the_old_shared_prompt_names_still_import_with_a_warning():
    import grpo.core.kv_cache as kv_cache
    import grpo.core.shared_prompt as old

    for name, new in [
        ("can_share", shared_prefix.can_share_prefix),
        ("prefix_ok", shared_prefix.prefix_sharing_verified),
        ("shared_prompt_hidden", shared_prefix.shared_prefix_hidden),
        ("check_prefix_sharing", shared_prefix.check_prefix_sharing),
        ("PromptRecorder", kv_cache.PrefixRecorder),
        ("SharedPromptCache", kv_cache.SharedPrefixTrainCache),
    ]:
        with pytest.warns(DeprecationWarning, match=f"shared_prompt.{name} is deprecated"):
            assert getattr(old, name) is new
    for name, new in [("PromptRecorder", kv_cache.PrefixRecorder),
                      ("SharedPromptCache", kv_cache.SharedPrefixTrainCache)]:  # fmt: skip
        with pytest.warns(DeprecationWarning, match=f"kv_cache.{name} is deprecated"):
            assert getattr(kv_cache, name) is new
    with pytest.raises(AttributeError, match="no_such_name"):
        old.no_such_name  # noqa: B018
