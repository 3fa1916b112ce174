"""GRPOTrainer end to end on the tiny seeded model: learning, resume, LoRA, full fine-tune."""

import math

import attrs
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from helpers import PROMPTS, flat_numpy, tiny_args
from mlx.utils import tree_flatten

import grpo  # noqa: F401
from grpo.core.rollout import Rollout
from grpo.io.checkpoint import CheckpointError
from grpo.io.logging import read_metrics
from grpo.io.model import is_quantized, quantize
from grpo.trainer import GRPOTrainer

TOKENS = mx.array([[5, 40, 41, 77, 12, 9, 30, 31]])
TRL_METRICS = (
    "loss",
    "reward",
    "reward_std",
    "rewards/sevens/mean",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/clipped_ratio",
    "num_tokens",
    "learning_rate",
    "grad_norm",
    "step_time",
    "tokens_per_second",
)


def sevens(completions, **kwargs):
    """Toy verifiable reward: fraction of completion characters that are '7'."""
    return [sum(ch == "7" for ch in text) / max(len(text), 1) for text in completions]


def lowercase(completions, **kwargs):
    """A dense reward (about a fifth of random characters qualify), so every group varies."""
    return [sum(ch.islower() for ch in text) / max(len(text), 1) for text in completions]


def _args(tmp_path, **kw):
    return tiny_args(
        tmp_path,
        **{
            "lr_scheduler_type": "constant",
            "max_steps": 30,
            "num_generations": 8,
            "per_device_train_batch_size": 16,
            "max_prompt_length": 16,
            "save_steps": 1000,
            "lora_rank": 16,
            "lora_alpha": 64,
            "beta": 0.01,
            **kw,
        },
    )


def _logits(model, params=None):
    if params is not None:
        model.update(params)
    return np.array(model(TOKENS))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    trainer = GRPOTrainer(str(tiny_model_dir), sevens, args=_args(out), train_dataset=PROMPTS)
    trainer.train()
    return trainer, out


def test_learns_toy_task_with_finite_metrics(trained):
    trainer, out = trained
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    for name in TRL_METRICS:
        assert name in records[-1], name
    for r in records:
        for k, v in r.items():
            assert v is not None and math.isfinite(v), (r["step"], k, v)
        assert r["kl"] >= 0
    rewards = [r["reward"] for r in records]
    early, late = np.mean(rewards[:5]), np.mean(rewards[-10:])
    # A random 128-token model emits '7' about 1/128 of the time. (With LoRA on this model the
    # frozen tied embeddings cap p('7') near 0.15, so the reachable margin is ~0.1.)
    assert early < 0.05
    assert late > early + 0.05, (early, late, rewards)
    assert records[-1]["num_tokens"] > records[0]["num_tokens"] > 0
    assert (out / "checkpoint-30").is_dir()  # the final checkpoint


def test_lora_reference_is_base_and_saved_adapters_reload(trained, tiny_model_dir, tmp_path):
    trainer, _ = trained
    base, _ = mlx_lm.load(str(tiny_model_dir))
    base_logits = _logits(base)
    policy_logits = _logits(trainer.model, trainer.state.params)
    ref_logits = _logits(trainer.model, trainer.policy.ref_params)
    np.testing.assert_array_equal(ref_logits, base_logits)  # adapters off == base, exactly
    assert np.abs(policy_logits - base_logits).max() > 1e-3  # training moved the policy
    trainable = flat_numpy(trainer.state.params)
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)

    saved = trainer.save_model(tmp_path / "final")
    reloaded, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(saved))
    np.testing.assert_allclose(_logits(reloaded), policy_logits, rtol=1e-5, atol=1e-5)
    from_ckpt, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(trained[1] / "checkpoint-30"))
    np.testing.assert_allclose(_logits(from_ckpt), policy_logits, rtol=1e-5, atol=1e-5)


def test_evaluate_reports_mean_reward_per_function(trained):
    trainer, _ = trained
    metrics = trainer.evaluate(PROMPTS[:4])
    assert {"eval_rewards/sevens/mean", "eval_reward", "eval_loss", "eval_kl"} <= set(metrics)
    assert 0.0 <= metrics["eval_rewards/sevens/mean"] <= 1.0
    assert metrics["eval_reward"] == pytest.approx(metrics["eval_rewards/sevens/mean"])


class _StopAt:
    def __init__(self, step):
        self.step = step

    def on_save(self, trainer, path):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_replays_the_identical_trajectory(tiny_model_dir, tmp_path):
    kw = dict(
        max_steps=6,
        save_steps=3,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_generations=4,
        num_iterations=3,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        warmup_steps=1,
    )
    straight = GRPOTrainer(
        str(tiny_model_dir), sevens, args=_args(tmp_path / "a", **kw), train_dataset=PROMPTS
    )
    straight.train()

    first = GRPOTrainer(
        str(tiny_model_dir),
        sevens,
        args=_args(tmp_path / "b", **kw),
        train_dataset=PROMPTS,
        callbacks=[_StopAt(3)],
    )
    first.train()
    assert first.global_step == 3
    resumed = GRPOTrainer(
        str(tiny_model_dir), sevens, args=_args(tmp_path / "b", **kw), train_dataset=PROMPTS
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert resumed.global_step == 6

    want, got = flat_numpy(straight.state.params), flat_numpy(resumed.state.params)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for k, v in flat_numpy(straight.state.opt_state).items():
        np.testing.assert_array_equal(flat_numpy(resumed.state.opt_state)[k], v, err_msg=k)
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["reward"] for r in b] == [r["reward"] for r in a]


def test_resume_from_missing_checkpoint_is_an_error(tiny_model_dir, tmp_path):
    trainer = GRPOTrainer(
        str(tiny_model_dir), sevens, args=_args(tmp_path, max_steps=1), train_dataset=PROMPTS
    )
    with pytest.raises(CheckpointError, match="not found"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_full_finetune_keeps_a_frozen_reference(tiny_model_dir, tmp_path):
    args = _args(tmp_path, use_lora=False, beta=0.1, max_steps=3, learning_rate=1e-3)
    trainer = GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS)
    ref_before = _logits(trainer.model, trainer.policy.ref_params)
    policy_before = _logits(trainer.model, trainer.state.params)
    np.testing.assert_array_equal(ref_before, policy_before)
    trainer.train()
    ref_after = _logits(trainer.model, trainer.policy.ref_params)
    policy_after = _logits(trainer.model, trainer.state.params)
    np.testing.assert_array_equal(ref_after, ref_before)  # the reference never moves
    assert np.abs(policy_after - policy_before).max() > 1e-4  # the policy does
    assert len(flat_numpy(trainer.state.params)) == len(tree_flatten(trainer.model.parameters()))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["kl"] >= 0 and math.isfinite(r["kl"]) for r in records)
    assert records[-1]["kl"] > 0


def test_qlora_trains_adapters_on_a_quantized_base(tiny_model_dir, tmp_path):
    args = _args(tmp_path, quantize_bits=4, quantize_group_size=32, beta=0.1, max_steps=2)
    trainer = GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS)
    base, _ = mlx_lm.load(str(tiny_model_dir))
    quantize(base, bits=4, group_size=32)
    trainer.train()
    assert is_quantized(trainer.model)
    assert all(k.endswith(("lora_a", "lora_b")) for k in flat_numpy(trainer.state.params))
    np.testing.assert_array_equal(_logits(trainer.model, trainer.policy.ref_params), _logits(base))
    assert np.abs(_logits(trainer.model, trainer.state.params) - _logits(base)).max() > 1e-4
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(v) for r in records for v in r.values())


def test_beta_zero_full_finetune_has_no_reference(tiny_model_dir, tmp_path):
    args = _args(tmp_path, use_lora=False, beta=0.0, max_steps=1)
    trainer = GRPOTrainer(str(tiny_model_dir), sevens, args=args, train_dataset=PROMPTS)
    assert trainer.policy.ref_params is None


def test_mask_truncated_completions_zeroes_truncated_rows(tiny_model_dir, tmp_path):
    args = _args(tmp_path, mask_truncated_completions=True, max_steps=1)
    trainer = GRPOTrainer(str(tiny_model_dir), sevens, args=args, train_dataset=PROMPTS)
    N, T = 16, 4
    mask = mx.ones((N, T))
    truncated = mx.array(np.arange(N) % 3 == 0)
    roll = Rollout(
        prompt_ids=mx.full((N, 2), 5, mx.int32),
        prompt_lengths=mx.full((N,), 2, mx.int32),
        completion_ids=mx.full((N, T), 7, mx.int32),
        logprobs=mx.zeros((N, T)),
        completion_mask=mask,
        is_truncated=truncated,
        completion_lengths=mx.full((N,), T, mx.int32),
    )
    batch = trainer._loss_batch(roll, mx.zeros((N,)))
    got = np.array(batch.completion_mask)
    np.testing.assert_array_equal(got[np.array(truncated)], 0.0)
    np.testing.assert_array_equal(got[~np.array(truncated)], 1.0)
    off = GRPOTrainer(
        str(tiny_model_dir),
        sevens,
        args=attrs.evolve(args, mask_truncated_completions=False),
        train_dataset=PROMPTS,
    )
    np.testing.assert_array_equal(
        np.array(off._loss_batch(roll, mx.zeros((N,))).completion_mask), 1.0
    )


def test_constructor_errors(tiny_model_dir, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="reward weights"):
        GRPOTrainer(
            str(tiny_model_dir),
            sevens,
            args=_args(tmp_path, reward_weights=[1.0, 2.0]),
            train_dataset=PROMPTS,
        )
    with pytest.raises(ValueError, match="processing_class"):
        GRPOTrainer(tiny_model[0], sevens, args=_args(tmp_path), train_dataset=PROMPTS)

    def needs_answer(completions, answer, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="answer"):
        GRPOTrainer(str(tiny_model_dir), needs_answer, args=_args(tmp_path), train_dataset=PROMPTS)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        GRPOTrainer(str(tiny_model_dir), sevens, args=_args(f), train_dataset=PROMPTS)


def test_log_completions_prints_a_table_and_callbacks_see_logs(tiny_model_dir, tmp_path, capsys):
    seen = []

    class Recorder:
        def on_log(self, trainer, logs):
            seen.append(logs)

    def tagged(completions, log_extra=None, log_metric=None, **kwargs):
        log_extra("tag", ["XQ" for _ in completions])  # TRL: a column of the completions table
        log_metric("tagged/ratio", 0.25)  # TRL: a logged metric
        return [0.0 for _ in completions]

    args = _args(tmp_path, max_steps=1, log_completions=True, num_completions_to_print=2)
    trainer = GRPOTrainer(
        str(tiny_model_dir),
        [sevens, lowercase, tagged],
        args=args,
        train_dataset=PROMPTS,
        callbacks=[Recorder()],
    )
    trainer.train()
    out = capsys.readouterr().out
    assert "Step 1" in out and "Advantage" in out and "lowercase" in out
    assert "XQ" in out  # log_extra's column reaches the completions table
    assert [r["step"] for r in seen] == [1]
    assert seen[0]["tagged/ratio"] == 0.25
    assert {"rewards/sevens/mean", "rewards/lowercase/mean", "reward"} <= set(seen[0])


def test_epochs_eval_steps_and_recomputed_old_logprobs(tiny_model_dir, tmp_path):
    """max_steps=-1 trains num_train_epochs; eval_steps logs eval rewards; with top-k sampling
    and num_iterations=2 the old log-probs come from the model, so step 1 has ratio 1."""
    args = _args(
        tmp_path,
        max_steps=-1,
        num_train_epochs=1,
        eval_strategy="steps",
        eval_steps=2,
        num_iterations=2,
        top_k=20,
    )
    trainer = GRPOTrainer(
        str(tiny_model_dir), sevens, args=args, train_dataset=PROMPTS, eval_dataset=PROMPTS[:2]
    )
    assert trainer.max_steps == 8  # 8 prompts / 2 per generation batch * 2 iterations
    trainer.train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert train[0]["clip_ratio/region_mean"] == 0.0


def test_non_finite_step_stops_without_updating(tiny_model_dir, tmp_path):
    from grpo.trainer import NonFiniteError

    trainer = GRPOTrainer(str(tiny_model_dir), sevens, args=_args(tmp_path), train_dataset=PROMPTS)
    before = flat_numpy(trainer.state.params)

    def poisoned_step(state, batch):
        moved = state._replace(params={"junk": mx.zeros(1)}, step=state.step + 1)
        return moved, {"loss": mx.array(float("nan")), "grad_norm": mx.array(1.0)}

    trainer._train_step = poisoned_step
    with pytest.raises(NonFiniteError, match=r"loss=nan at step 1"):
        trainer.train()
    after = flat_numpy(trainer.state.params)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert trainer.global_step == 0


def test_real_step_traces_once_per_bucketed_shape(tiny_model_dir, tmp_path):
    from grpo.core.step import make_train_step

    args = _args(tmp_path, max_steps=12, max_completion_length=8)
    trainer = GRPOTrainer(str(tiny_model_dir), sevens, args=args, train_dataset=PROMPTS)
    traces, shapes = [0], set()

    def counting_loss(params, batch):
        traces[0] += 1  # runs only while mx.compile traces
        return trainer._loss_fn(params, batch)

    compiled = make_train_step(counting_loss, trainer.optimizer, **args.train_step_kwargs())

    def step(state, batch):
        shapes.add((tuple(batch.input_ids.shape), tuple(batch.completion_ids.shape)))
        return compiled(state, batch)

    trainer._train_step = step
    trainer.train()
    assert trainer.global_step == 12
    assert len(shapes) >= 2  # prompt lengths 1-3 land in different buckets
    assert traces[0] == len(shapes)  # one trace per distinct padded shape, no retracing
    assert all(t[1][-1] in (1, 2, 4, 8) for t in shapes)  # completion lengths are bucketed
