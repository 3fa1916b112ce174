"""Every tested mlx-lm architecture trains on exactly its own log-probs (tests/arch_cases.py).

The independent reference is mlx-lm's own full forward, ``log_softmax(model(prompt ++
completion))``, read at the completion positions.
"""

import mlx.core as mx
import numpy as np
import pytest
from arch_cases import CASES, build

from grpo.core.batch import LossBatch, pack
from grpo.core.lm import check_split
from grpo.core.loss import completion_logprobs
from grpo.io.model import load_model

MODEL_TYPES = list(CASES)


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return lambda name: build(root / name, name) if not (root / name).exists() else root / name


def _load(arch_dirs, name):
    # grpo's loader: mlx_lm.load plus grpo's CPU attention (the path training takes).
    return load_model(str(arch_dirs(name)))


def _batch(P=5, T=4, G=2, seed=0):
    # Two prompts of different lengths, G completions each (rows group-contiguous).
    rng = np.random.default_rng(seed)
    lengths = mx.repeat(mx.array([P, P - 2], dtype=mx.int32), G)
    prompts = mx.repeat(mx.array(rng.integers(3, 99, (2, P)), dtype=mx.int32), G, axis=0)
    completions = mx.array(rng.integers(3, 99, (2 * G, T)), dtype=mx.int32)
    ids = pack(prompts, lengths, completions)
    mask = mx.ones((2 * G, T), mx.float32)
    return LossBatch(ids, lengths, completions, mask, mx.zeros((2 * G,), mx.float32))


def _reference_logprobs(model, batch):
    # mlx-lm's own forward on each row alone (no padding), float64 log-softmax in NumPy.
    out = []
    for i in range(batch.input_ids.shape[0]):
        s, T = int(batch.completion_start[i]), batch.completion_ids.shape[1]
        logits = np.array(model(batch.input_ids[i : i + 1, : s + T]).astype(mx.float32), np.float64)
        z = logits[0, s - 1 : s + T - 1]
        logp = (
            z
            - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - z.max(-1, keepdims=True)
        )
        out.append(
            np.take_along_axis(logp, np.array(batch.completion_ids[i])[:, None], axis=1)[:, 0]
        )
    return np.stack(out)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loss_logprobs_are_the_models_own(arch_dirs, model_type):
    model, _ = _load(arch_dirs, model_type)
    model.eval()
    batch = _batch()
    want = _reference_logprobs(model, batch)
    # Every listed type takes the split (chunked-head) path, not the full-forward fallback.
    assert check_split(model)
    for share in (1, 2):
        got = completion_logprobs(model, model.trainable_parameters(), batch, prompt_share=share)
        np.testing.assert_allclose(np.array(got), want, atol=1e-5, rtol=0, err_msg=f"share={share}")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rollout_logprobs_equal_training_forward(arch_dirs, model_type):
    from grpo.core.rollout import rollout
    from grpo.core.sampling import SamplingConfig

    model, _ = _load(arch_dirs, model_type)
    # Ragged prompts longer than the sliding windows (4), and eos ids that end rows early.
    prompts = [[5, 9, 17, 33, 40, 41, 60], [7, 8, 12]]
    sampling = SamplingConfig(group_size=2, max_tokens=6, temperature=0.9, eos_ids=(11, 12))
    roll = rollout(model.parameters(), mx.random.key(3), prompts, model=model, sampling=sampling)
    batch = LossBatch(
        pack(roll.prompt_ids, roll.prompt_lengths, roll.completion_ids),
        roll.prompt_lengths,
        roll.completion_ids,
        roll.completion_mask,
        mx.zeros((4,), mx.float32),
    )
    model.eval()
    got = completion_logprobs(model, model.parameters(), batch, temperature=0.9, prompt_share=2)
    mask = np.array(roll.completion_mask) > 0
    assert mask.sum() >= 4
    np.testing.assert_allclose(np.array(roll.logprobs)[mask], np.array(got)[mask], atol=1e-4)


def id_sum(completions, completion_ids, **kwargs):
    """A reward that differs between almost any two sampled completions (nonzero advantages)."""
    return [float(sum(ids)) for ids in completion_ids]


def _assert_experts_adapted(model):
    # mlx-lm's own switch-layer LoRA on every expert bank that LoRA reaches (MoE types).
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.lora import LoRASwitchLinear

    modules = [m for _, m in model.named_modules()]
    banks = [m for m in modules if isinstance(m, SwitchLinear)]
    if banks:
        adapted = [m for m in modules if isinstance(m, LoRASwitchLinear)]
        assert adapted and len(adapted) == len(banks)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_two_grpo_steps_train(arch_dirs, tmp_path, model_type, use_lora):
    from helpers import PROMPTS, flat_numpy, tiny_args

    from grpo.trainer import GRPOTrainer

    args = tiny_args(
        tmp_path,
        max_steps=2,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=3,
        use_lora=use_lora,
        lora_rank=4,
        beta=0.04,
        save_steps=1000,
    )
    trainer = GRPOTrainer(str(arch_dirs(model_type)), id_sum, args=args, train_dataset=PROMPTS)
    before = flat_numpy(trainer.state.params)
    if use_lora:
        _assert_experts_adapted(trainer.model)
    trainer.train()
    after = flat_numpy(trainer.state.params)
    assert set(before) == set(after) and before
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed, "no trainable parameter moved"
    for record in trainer.log_history:
        bad = {k: v for k, v in record.items() if isinstance(v, float) and not np.isfinite(v)}
        assert not bad, bad
    assert len(trainer.log_history) == 2


def test_a_head_that_reads_the_inputs_falls_back_to_the_full_forward(arch_dirs):
    # A model whose __call__ does more than head(trunk(x)) (here: a logit bias that depends
    # on the input ids) fails the construction check and is scored by its own forward.
    from mlx_lm.models import llama

    class Biased(llama.Model):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            out = super().__call__(inputs, cache, input_embeddings)
            return out + 0.5 * (inputs[..., None] % 3).astype(out.dtype)

    model, _ = _load(arch_dirs, "llama")
    model.__class__ = Biased
    model.eval()
    assert not check_split(model)
    batch = _batch()
    want = _reference_logprobs(model, batch)
    got = completion_logprobs(model, model.trainable_parameters(), batch, prompt_share=2)
    np.testing.assert_allclose(np.array(got), want, atol=1e-5, rtol=0)


def test_support_matrix_doc_is_generated_from_the_cases(arch_dirs):
    from pathlib import Path

    from arch_cases import support_matrix

    doc = Path(__file__).parent.parent / "docs" / "models.md"
    assert doc.read_text() == support_matrix(arch_dirs), (
        "regenerate: python tests/arch_cases.py > docs/models.md"
    )


def test_router_aux_loss_coef_is_refused_naming_the_model_type(arch_dirs, tmp_path):
    from helpers import PROMPTS, tiny_args

    from grpo.trainer import GRPOTrainer

    args = tiny_args(tmp_path, router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match="router_aux_loss_coef.*'qwen3_moe'"):
        GRPOTrainer(str(arch_dirs("qwen3_moe")), id_sum, args=args, train_dataset=PROMPTS)


def test_an_unsupported_model_is_refused_at_construction(arch_dirs, tmp_path):
    # A forward that does not return [1, L, V] logits (here a tuple) cannot be trained.
    from helpers import PROMPTS, tiny_args
    from mlx_lm.models import llama

    from grpo.trainer import GRPOTrainer

    class Pair(llama.Model):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return super().__call__(inputs, cache, input_embeddings), None

    model, tok = _load(arch_dirs, "llama")
    model.__class__ = Pair
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        GRPOTrainer(
            model, id_sum, args=tiny_args(tmp_path), train_dataset=PROMPTS, processing_class=tok
        )


def test_fork_cache_repeats_every_cache_type_per_row():
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

    from grpo.core.rollout import fork_cache

    k = mx.random.normal((1, 2, 5, 4), key=mx.random.key(0))
    kv, rot, quant = KVCache(), RotatingKVCache(max_size=3), KVCache()
    kv.update_and_fetch(k, k + 1)
    rot.update_and_fetch(k, k - 1)
    quant.update_and_fetch(mx.tile(k, (1, 1, 1, 8)), mx.tile(k, (1, 1, 1, 8)))
    quant = quant.to_quantized(group_size=32, bits=8)
    arrays = ArraysCache(2)
    arrays[0], arrays[1] = k[:, :, :2], k[:, 0]
    caches = [kv, rot, quant, arrays, CacheList(KVCache(), ArraysCache(1))]
    caches[-1][0].update_and_fetch(k, k)
    caches[-1][1][0] = k[:, 0]
    before = [tree_flatten(c.state) for c in caches]
    fork_cache(caches, 3)
    for old, c in zip(before, caches, strict=True):
        for (_, a), (_, b) in zip(old, tree_flatten(c.state), strict=True):
            if isinstance(a, mx.array):
                assert b.shape == (3, *a.shape[1:])
                np.testing.assert_array_equal(np.array(b), np.repeat(np.array(a), 3, axis=0))
            else:
                assert a == b
