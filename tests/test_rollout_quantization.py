"""``rollout_quantization``: the rollout samples from a quantized copy of the current policy
(LoRA merged first, re-quantized before every rollout); the float forward gives the old
log-probs and the loss corrects the mismatch as TRL corrects vLLM's."""

import copy
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from helpers import PROMPTS, tiny_args
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import grpo  # noqa: F401
import grpo.evaluate
from grpo import cli
from grpo.core.quantize import quantized_copy, quantized_params, rollout_group_size
from grpo.errors import ConfigError
from grpo.io.logging import read_metrics
from grpo.io.model import quantize
from grpo.trainer import GRPOTrainer

# Every trainer here is on the CPU backend, where the slow-sampler warning is expected; one
# test below checks it.
pytestmark = pytest.mark.filterwarnings("ignore:rollout_quantization on MLX's CPU backend")

MISMATCH_METRICS = (
    "sampling/sampling_logp_difference/mean",
    "sampling/sampling_logp_difference/max",
    "sampling/importance_sampling_ratio/min",
    "sampling/importance_sampling_ratio/mean",
    "sampling/importance_sampling_ratio/max",
)
TOKENS = mx.array([[5, 40, 41, 77, 12, 9, 30, 31]])


def lowercase(completions, **kwargs):
    return [sum(ch.islower() for ch in text) / max(len(text), 1) for text in completions]


def _lora_model(tiny_model, seed=0):
    # A private LoRA copy of the session model, with adapters far from zero.
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = copy.deepcopy(tiny_model[0])
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    keys = iter(mx.random.split(mx.random.key(seed), 100))
    adapters = tree_map(
        lambda p: 0.05 * mx.random.normal(p.shape, key=next(keys)), model.trainable_parameters()
    )
    return model, adapters


def _reference(model, params, *, bits, group_size):
    # What the sampler must be: mlx-lm's own LoRA fuse, then mlx's nn.quantize.
    ref = copy.deepcopy(model)
    ref.update(params)
    fused = [(p, m.fuse()) for p, m in ref.named_modules() if "lora_a" in m]
    if fused:
        ref.update_modules(tree_unflatten(fused))
    nn.quantize(ref, group_size=group_size, bits=bits)
    return dict(tree_flatten(ref.parameters()))


def _assert_same(tree, want: dict):
    got = dict(tree_flatten(tree))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.array(got[k]), np.array(v), err_msg=k)


def _logits(model, params):
    model.update(params)
    return np.array(model(TOKENS))


# ------------------------------------------------------------------ the copy


@pytest.mark.parametrize("bits", [8, 4])
def test_copy_is_nn_quantize_of_the_merged_lora_policy(tiny_model, bits):
    model, adapters = _lora_model(tiny_model)
    q = quantized_copy(model, bits=bits, group_size=32)
    params = quantized_params(model, adapters, bits=bits, group_size=32)
    _assert_same(params, _reference(model, adapters, bits=bits, group_size=32))
    assert type(q.layers[0].self_attn.q_proj) is nn.QuantizedLinear
    assert type(q.model.embed_tokens) is nn.QuantizedEmbedding
    # The sampler is the adapted policy, up to quantization error: LoRA was merged first.
    policy = _logits(model, adapters)
    base = _logits(model, tree_map(mx.zeros_like, adapters))
    sampler = _logits(q, params)
    err, moved = np.abs(sampler - policy).max(), np.abs(policy - base).max()
    assert err < (0.1 if bits == 8 else 0.5) * moved, (err, moved)
    assert np.abs(sampler - base).max() > 0.5 * moved


def test_copy_leaves_the_policy_model_untouched(tiny_model):
    model, adapters = _lora_model(tiny_model)
    model.update(adapters)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    quantized_copy(model, bits=8, group_size=32)
    quantized_params(model, tree_map(mx.zeros_like, adapters), bits=8, group_size=32)
    after = dict(tree_flatten(model.parameters()))
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)
    assert type(model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"


def test_group_size_is_chosen_or_refused_naming_the_field(tiny_model):
    model = tiny_model[0]  # input sizes 128 and 352 (the MLP down projection)
    assert rollout_group_size(model, None) == 32
    assert rollout_group_size(model, 32) == 32
    with pytest.raises(ValueError, match=r"rollout_quantization_group_size=64.*352.*=32"):
        rollout_group_size(model, 64)


def test_refuses_an_already_quantized_model(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    quantize(model, bits=4, group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        quantized_copy(model, bits=8, group_size=32)


# ------------------------------------------------------------------ the trainer


def _trainer(tiny_model_dir, tmp_path, **kw):
    args = tiny_args(tmp_path, **{"max_steps": 2, "rollout_quantization": 8, **kw})
    return GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS)


def test_sampler_is_requantized_from_the_current_policy_before_every_rollout(
    tiny_model_dir, tmp_path
):
    trainer = _trainer(tiny_model_dir, tmp_path, learning_rate=5e-2)
    seen = []
    original = trainer.rollout_policy

    def spy():
        params, model = original()
        want = _reference(trainer.model, trainer.state.params, bits=8, group_size=32)
        _assert_same(params, want)  # nn.quantize of the merged weights of *this* step
        seen.append((trainer.global_step, dict(tree_flatten(params))))
        return params, model

    trainer.rollout_policy = spy
    trainer.train()
    assert [step for step, _ in seen] == [0, 1]  # one rollout per optimizer step here
    (_, first), (_, second) = seen
    changed = [k for k in first if not np.array_equal(np.array(first[k]), np.array(second[k]))]
    assert changed, "the sampler did not follow the updated policy"
    # The copy samples quantized weights, the policy keeps float ones.
    q = trainer.rollout_model
    assert type(q.layers[0].self_attn.q_proj) is nn.QuantizedLinear
    assert type(trainer.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_two_steps_log_finite_metrics_with_trls_mismatch_metrics(
    tiny_model_dir, tmp_path, use_lora
):
    trainer = _trainer(tiny_model_dir, tmp_path, use_lora=use_lora, beta=0.01)
    trainer.train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for name in MISMATCH_METRICS + ("loss", "grad_norm", "kl", "reward"):
            assert name in r and math.isfinite(r[name]), (name, r.get(name))
        lo, mean, hi = (
            r[f"sampling/importance_sampling_ratio/{s}"] for s in ("min", "mean", "max")
        )
        assert 0 <= lo <= mean <= hi
        assert 0 < r["sampling/sampling_logp_difference/mean"] < 0.5  # 8 bits: close, not equal


def test_old_logprobs_are_the_float_policys_and_the_ratio_is_trls(tiny_model_dir, tmp_path):
    # Temperature-only sampling with two steps per generation would normally reuse the
    # rollout's log-probs as old log-probs; the quantized sampler's must never be.
    trainer = _trainer(
        tiny_model_dir, tmp_path, steps_per_generation=2, per_device_train_batch_size=4,
        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.5,
    )  # fmt: skip
    gen = trainer._generate(mx.random.key(3))
    batch = gen.windows[0]
    rows = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  ([K, n, ...] -> [K*n, ...])
    flat = type(batch)(*(None if x is None else rows(x) for x in batch))
    trainer.model.eval()
    float_old = trainer._logprobs(trainer.state.params, flat)
    np.testing.assert_allclose(np.array(flat.old_logprobs), np.array(float_old), atol=1e-5)
    mask = np.array(flat.completion_mask)
    old, samp = np.array(flat.old_logprobs), np.array(flat.sampling_logprobs)
    assert np.abs((old - samp) * mask).max() > 0  # the sampler is not the policy
    ratio = np.clip(np.exp(np.nan_to_num((old - samp) * mask)), 0.5, 3.0)
    np.testing.assert_allclose(np.array(flat.sampler_ratio), ratio, rtol=1e-5)
    for name in MISMATCH_METRICS:
        assert name in gen.metrics


def test_evaluate_samples_from_the_quantized_copy_and_corrects_the_loss(
    tiny_model_dir, tmp_path, monkeypatch
):
    trainer = _trainer(tiny_model_dir, tmp_path, rollout_quantization=4, beta=0.01)
    sampled_with, batches = [], []
    real_rollout, real_batch = grpo.evaluate.rollout, trainer._loss_batch

    def recording_rollout(params, key, prompts, *, model, sampling):
        sampled_with.append(model)
        return real_rollout(params, key, prompts, model=model, sampling=sampling)

    def recording_batch(*args, **kw):
        batches.append(real_batch(*args, **kw))
        return batches[-1]

    monkeypatch.setattr(grpo.evaluate, "rollout", recording_rollout)
    trainer._loss_batch = recording_batch
    out = trainer.evaluate(PROMPTS[:2])
    assert sampled_with and all(m is trainer.rollout_model for m in sampled_with)
    assert all(b.sampler_ratio is not None for b in batches)
    assert math.isfinite(out["eval_loss"])


def test_correction_off_keeps_sampling_logprobs_without_a_weight(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, vllm_importance_sampling_correction=False)
    gen = trainer._generate(mx.random.key(0))
    assert gen.windows[0].sampler_ratio is None
    assert gen.windows[0].sampling_logprobs is not None
    assert not any(k.startswith("sampling/") for k in gen.metrics)  # TRL logs them only on


def test_off_by_default_samples_the_policy_itself(tiny_model_dir, tmp_path):
    args = tiny_args(tmp_path, max_steps=1)
    trainer = GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS)
    params, model = trainer.rollout_policy()
    assert trainer.rollout_model is None and model is trainer.model
    assert params is trainer.state.params
    gen = trainer._generate(mx.random.key(0))
    assert gen.windows[0].sampler_ratio is None and gen.windows[0].sampling_logprobs is None


def test_construction_refusals_name_the_field(tiny_model_dir, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"rollout_quantization_group_size=64.*set "):
        _trainer(tiny_model_dir, tmp_path, rollout_quantization_group_size=64)
    with pytest.raises(ConfigError, match="rollout_quantization=4 with quantize_bits=4"):
        _trainer(tiny_model_dir, tmp_path, rollout_quantization=4, quantize_bits=4)
    quantized = copy.deepcopy(tiny_model[0])
    quantize(quantized, bits=4, group_size=32)
    with pytest.raises(ConfigError, match="already quantized"):
        GRPOTrainer(
            quantized, lowercase, args=tiny_args(tmp_path, rollout_quantization=8),
            train_dataset=PROMPTS, processing_class=tiny_model[1],
        )  # fmt: skip
    with pytest.raises(ConfigError, match="rollout_func"):
        GRPOTrainer(
            str(tiny_model_dir), lowercase, args=tiny_args(tmp_path, rollout_quantization=8),
            train_dataset=PROMPTS, rollout_func=lambda prompts, trainer: {},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="rollout_quantization must be one of"):
        tiny_args(tmp_path, rollout_quantization=2)


def test_cli_flag_and_yaml_set_the_fields(tmp_path):
    argv = ["train", "--rollout_quantization", "4", "--vllm_importance_sampling_mode", "token_mask"]
    got = cli.flag_overrides(cli.build_parser().parse_args(argv))
    assert got == {"rollout_quantization": 4, "vllm_importance_sampling_mode": "token_mask"}
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"rollout_quantization": 8, "rollout_quantization_group_size": 32})
    )
    values, _ = cli.yaml_overrides(cli.load_yaml(str(path)), str(path))
    cfg = cli.make_config({}, values)
    assert (cfg.rollout_quantization, cfg.rollout_quantization_group_size) == (8, 32)


def test_cap_is_trls_deprecated_alias_of_clip_max():
    from grpo.config import GRPOConfig

    with pytest.warns(FutureWarning, match="vllm_importance_sampling_clip_max"):
        cfg = GRPOConfig(vllm_importance_sampling_cap=2.5)
    assert cfg.vllm_importance_sampling_clip_max == 2.5


def test_tool_loop_samples_from_the_quantized_copy(tmp_path):
    from chat_tokenizers import build_chat_model
    from test_tools import multiply

    path = build_chat_model(tmp_path / "qwen", "qwen2_5")
    args = tiny_args(
        tmp_path / "out", rollout_quantization=8, num_generations=2,
        per_device_train_batch_size=2, max_completion_length=8, max_prompt_length=None,
    )  # fmt: skip
    data = [{"prompt": [{"role": "user", "content": "hi"}]}] * 4

    def reply_length(completions, **kwargs):
        return [float(len(c[-1]["content"])) for c in completions]

    trainer = GRPOTrainer(str(path), reply_length, args=args, train_dataset=data, tools=[multiply])
    used = []
    run = trainer._tool_loop.run

    def spy(params, key, prompts, tools, *, model, sampling):
        used.append(model)
        return run(params, key, prompts, tools, model=model, sampling=sampling)

    trainer._tool_loop.run = spy
    gen = trainer._generate(mx.random.key(0))
    assert used == [trainer.rollout_model]
    assert gen.windows[0].sampler_ratio is not None
    assert all(name in gen.metrics for name in MISMATCH_METRICS)


def test_the_cpu_backend_warns_that_the_quantized_sampler_is_slow(tiny_model_dir, tmp_path):
    assert mx.default_device() == mx.cpu  # this suite runs on the CPU backend
    with pytest.warns(UserWarning, match=r"rollout_quantization on MLX's CPU backend.*Metal"):
        _trainer(tiny_model_dir, tmp_path)
