"""GRPOTrainer with tools, environments and rollout_func (TRL's agentic API) on a tiny model
whose tokenizer carries the real Qwen2.5 chat template; the policy is scripted where TRL's
tests patch ``model.generate``."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from chat_tokenizers import build_chat_model
from helpers import flat_numpy, tiny_args
from scripted import ByContext
from test_tools import async_add, multiply

from grpo.core.loss import grpo_loss
from grpo.core.rollout import rollout
from grpo.io.logging import read_metrics
from grpo.trainer import GRPOTrainer

CALL = '<tool_call>\n{{"name": "{}", "arguments": {}}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("qwen_tiny"), "qwen2_5")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return mlx_lm.load(str(qwen_dir))


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


def _args(tmp_path, **kw):
    base = dict(
        num_generations=3,
        per_device_train_batch_size=3,
        max_completion_length=256,
        max_prompt_length=None,
        max_steps=1,
        learning_rate=0.1,
        use_lora=False,
    )
    return tiny_args(tmp_path, **{**base, **kw})


def _trainer(qwen, tmp_path, *, policy, args=None, **kw):
    model, tok = qwen
    kw.setdefault("train_dataset", [{"prompt": [{"role": "user", "content": "hi"}]}] * 4)
    trainer = GRPOTrainer(
        model,
        kw.pop("reward_funcs", None),
        args=args or _args(tmp_path),
        processing_class=tok,
        **kw,
    )
    if trainer._tool_loop is not None:
        trainer._tool_loop.sampler = ByContext(lambda ctx, g: _ids(tok, policy(tok.decode(ctx), g)))
    return trainer


def reward_len(completions, **kwargs):
    return [float(len(c[-1]["content"])) for c in completions]


def _first_turn(text):
    return "<tool_response>" not in text


def test_train_with_tools_counts_calls_and_failures(qwen, tmp_path):
    # TRL's test_train_with_tools: of 3 completions 2 call the tool, one of which fails.
    def policy(ctx, g):
        if not _first_turn(ctx):
            return "Done!"
        return [
            CALL.format("multiply", '{"a": 3, "b": 4}'),
            CALL.format("multiply", '{"a": 3, "c": 4}'),
            "I don't know any tool",
        ][g]

    model, _ = qwen
    before = flat_numpy(model.parameters())
    trainer = _trainer(qwen, tmp_path, policy=policy, tools=[multiply], reward_funcs=reward_len)
    trainer.train()
    last = trainer.log_history[-1]
    assert last["tools/call_frequency"] == pytest.approx(2 / 3)
    assert last["tools/failure_frequency"] == pytest.approx(1 / 2)
    assert last["tools/calls/multiply"] == pytest.approx(2 / 3)
    assert last["tools/turns_per_completion"] == pytest.approx(5 / 3)
    after = flat_numpy(trainer.state.params)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_async_tool_and_tools_rendered_into_the_prompt(qwen, tmp_path):
    seen = []

    def policy(ctx, g):
        seen.append(ctx)
        if _first_turn(ctx):
            return CALL.format("async_add", '{"a": 3, "b": 4}')
        return "7"

    trainer = _trainer(qwen, tmp_path, policy=policy, tools=[async_add], reward_funcs=reward_len)
    trainer.train()
    assert '"name": "async_add"' in seen[0] and "<tools>" in seen[0]  # the template's schema
    assert "<tool_response>\n7\n</tool_response>" in seen[-1]
    assert trainer.log_history[-1]["tools/failure_frequency"] == 0.0


def test_tool_tokens_never_train(qwen, tmp_path):
    """Perturbing old / reference log-probs on tool tokens changes neither loss nor gradient;
    the same perturbation on a model token does (so the check can fail)."""

    def policy(ctx, g):
        return CALL.format("multiply", '{"a": 2, "b": 5}') if _first_turn(ctx) else f"{g}0"

    args = _args(tmp_path, beta=0.1, num_iterations=2)
    trainer = _trainer(
        qwen, tmp_path, policy=policy, tools=[multiply], reward_funcs=reward_len, args=args
    )
    gen = trainer._generate(mx.random.key(0))
    window = gen.windows[0]
    batch = type(window)(*(None if x is None or x.ndim == 0 else x[0] for x in window))
    tool = np.array(batch.completion_mask) == 0
    tool &= np.arange(tool.shape[1])[None] < np.array(gen_lengths(batch))[:, None]
    assert tool.any(), "the scripted rows must contain tool tokens"

    def loss_and_grad(b):
        f = lambda p: grpo_loss(p, None, b, model=trainer.model, cfg=trainer.loss_config)[0]  # noqa: E731
        loss, grad = mx.value_and_grad(f)(trainer.state.params)
        return float(loss), flat_numpy(grad)

    def perturb(b, where):
        shift = mx.array(np.where(where, 5.0, 0.0).astype(np.float32))
        return b._replace(old_logprobs=b.old_logprobs + shift, ref_logprobs=b.ref_logprobs - shift)

    base = loss_and_grad(batch)
    moved = loss_and_grad(perturb(batch, tool))
    assert moved[0] == base[0]
    for k in base[1]:
        np.testing.assert_array_equal(moved[1][k], base[1][k], err_msg=k)
    model_tok = np.array(batch.completion_mask) > 0
    assert loss_and_grad(perturb(batch, model_tok))[0] != base[0]


def gen_lengths(batch):
    # Real (unpadded) completion length of each row: up to its last non-pad id.
    ids = np.array(batch.completion_ids)
    return [int(np.flatnonzero(r).max()) + 1 if r.any() else 0 for r in ids]


# -- environments -------------------------------------------------------------------------------


class CounterEnvironment:
    def reset(self, **kwargs):
        self._counter = 0

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self._counter += step
        return self._counter


class ScoredCounter(CounterEnvironment):
    def get_reward(self) -> float:
        return float(self._counter)


def _counter_policy(ctx, g):
    if not _first_turn(ctx):
        return "Done!"
    return [
        CALL.format("increment", '{"step": 1}'),
        CALL.format("decrement", '{"step": 2}'),
        "I won't increment",
    ][g]


def test_environment_factory_one_instance_per_row(qwen, tmp_path):
    trainer = _trainer(
        qwen,
        tmp_path,
        policy=_counter_policy,
        environment_factory=CounterEnvironment,
        reward_funcs=reward_len,
        train_dataset=None,
        args=_args(tmp_path, max_steps=1),
    )
    assert [t.__name__ for t in trainer.tools] == ["increment"]
    trainer.train()
    assert [e._counter for e in trainer.environments] == [1, 0, 0]
    last = trainer.log_history[-1]
    assert last["tools/call_frequency"] == pytest.approx(2 / 3)
    assert last["tools/failure_frequency"] == pytest.approx(1 / 2)


def test_environment_owned_reward(qwen, tmp_path):
    trainer = _trainer(
        qwen,
        tmp_path,
        policy=_counter_policy,
        environment_factory=ScoredCounter,
        train_dataset=None,
    )
    assert trainer.reward_names == ("ScoredCounter",)
    assert np.array(trainer.reward_weights).tolist() == [1.0]
    assert "get_reward" not in [t.__name__ for t in trainer.tools]
    trainer.train()
    assert trainer.log_history[-1]["rewards/ScoredCounter/mean"] == pytest.approx(1 / 3)


def test_environment_reward_beside_reward_funcs_and_mixed_environments(qwen, tmp_path):
    class Plain(CounterEnvironment):
        pass

    trainer = _trainer(
        qwen,
        tmp_path,
        policy=_counter_policy,
        reward_funcs=reward_len,
        environment_factory={"scored": ScoredCounter, "scored2": ScoredCounter, "plain": Plain},
        train_dataset=[{"environment": e} for e in ("scored", "scored2", "plain")] * 2,
        args=_args(tmp_path, reward_weights=[0.5]),
    )
    assert trainer.reward_names == ("reward_len", "ScoredCounter")
    assert np.array(trainer.reward_weights).tolist() == [0.5, 1.0]
    env_reward = trainer.reward_funcs[-1]
    a, b = ScoredCounter(), Plain()
    a.reset()
    b.reset()
    assert env_reward(environments=[a, b]) == [0.0, None]


def test_multiple_environments_route_rows_and_reset_kwargs(qwen, tmp_path):
    seen = {"counter": [], "echo": []}

    class Counter(CounterEnvironment):
        def reset(self, **kwargs):
            seen["counter"].append(kwargs)
            super().reset()
            return "Count."

    class Echo:
        def reset(self, **kwargs):
            seen["echo"].append(kwargs)
            return "Echo."

        def shout(self, text: str) -> str:
            """
            Shout the given text.

            Args:
                text: Text to shout.
            """
            return text.upper()

    def policy(ctx, g):
        if not _first_turn(ctx):
            return "Done!"
        if g == 1:
            return "no"
        if "Count." in ctx:
            return CALL.format("increment", '{"step": 1}')
        return CALL.format("shout", '{"text": "hi"}')

    trainer = _trainer(
        qwen,
        tmp_path,
        policy=policy,
        reward_funcs=reward_len,
        environment_factory={"counter": Counter, "echo": Echo},
        train_dataset=[
            {"prompt": [{"role": "user", "content": "go"}], "environment": e}
            for e in ("counter", "echo")
        ]
        * 4,
        args=_args(
            tmp_path, num_generations=2, per_device_train_batch_size=4, shuffle_dataset=False
        ),
    )
    assert [t.__name__ for t in trainer._environments.env_tools["counter"]] == ["increment"]
    assert [t.__name__ for t in trainer._environments.env_tools["echo"]] == ["shout"]
    trainer.train()
    assert trainer.log_history[-1]["tools/call_frequency"] == pytest.approx(2 / 4)
    assert trainer.log_history[-1]["tools/failure_frequency"] == 0.0
    assert len(seen["counter"]) == 2 and len(seen["echo"]) == 2
    assert all("environment" not in kw and "prompt" in kw for kw in seen["counter"] + seen["echo"])
    assert [type(e).__name__ for e in trainer.environments] == [
        "Counter",
        "Counter",
        "Echo",
        "Echo",
    ]


def test_environment_errors(qwen, tmp_path):
    model, tok = qwen
    data = [{"prompt": [{"role": "user", "content": "x"}], "environment": "unknown"}] * 4
    trainer = _trainer(
        qwen, tmp_path, policy=_counter_policy, reward_funcs=reward_len,
        environment_factory={"counter": CounterEnvironment}, train_dataset=data,
    )  # fmt: skip
    with pytest.raises(ValueError, match="not among the environments"):
        trainer.train()
    with pytest.raises(ValueError, match="No reward source provided"):
        GRPOTrainer(model, None, args=_args(tmp_path), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="train_dataset is required"):
        GRPOTrainer(model, reward_len, args=_args(tmp_path), processing_class=tok)
    with pytest.raises(ValueError, match="max_steps"):
        GRPOTrainer(
            model, reward_len, args=_args(tmp_path, max_steps=-1), processing_class=tok,
            environment_factory=CounterEnvironment,
        )  # fmt: skip
    with pytest.raises(ValueError, match="requires a train_dataset"):
        GRPOTrainer(
            model, reward_len, args=_args(tmp_path), processing_class=tok,
            environment_factory={"a": CounterEnvironment, "b": ScoredCounter},
        )  # fmt: skip

    class NoReset:
        pass

    with pytest.raises(ValueError, match="must define a callable reset"):
        GRPOTrainer(
            model, reward_len, args=_args(tmp_path), processing_class=tok, train_dataset=data,
            environment_factory=NoReset,
        )  # fmt: skip


def lowercase(completions, **kwargs):
    """A dense reward on the final message, so every group's rewards differ."""
    text = [c[-1]["content"] for c in completions]
    return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in text]


class SeededEnv:
    """Owns its data: reset() draws the task from the row, so a resumed run sees the same."""

    def reset(self, **kwargs):
        self.target = len(kwargs["prompt"][-1]["content"]) % 5
        self.total = 0
        return f" target {self.target}"

    def add(self, n: int) -> int:
        """
        Add to the running total.

        Args:
            n: The amount.
        """
        self.total += n
        return self.total

    def get_reward(self) -> float:
        return -abs(self.target - self.total)


def test_resume_with_environments_reproduces_the_uninterrupted_run(qwen_dir, tmp_path):
    class StopAt:
        def __init__(self, step):
            self.step = step

        def on_step_end(self, trainer, step, metrics):
            if step == self.step:
                trainer.should_stop = True

    data = [{"prompt": [{"role": "user", "content": "x" * k}]} for k in range(1, 9)]

    def run(out, *, stop=None, resume=None):
        model, tok = mlx_lm.load(str(qwen_dir))
        args = _args(
            out,
            max_steps=4,
            save_steps=2,
            num_generations=2,
            per_device_train_batch_size=4,
            max_completion_length=48,
            learning_rate=1e-2,
        )
        trainer = GRPOTrainer(
            model, lowercase, args=args, train_dataset=data, processing_class=tok,
            environment_factory=SeededEnv, callbacks=[StopAt(stop)] if stop else None,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    initial = flat_numpy(mlx_lm.load(str(qwen_dir))[0].parameters())
    straight = run(tmp_path / "a")
    assert straight.reward_names == ("lowercase", "SeededEnv")
    moved = flat_numpy(straight.state.params)
    assert any(not np.array_equal(initial[k], moved[k]) for k in initial)
    first = run(tmp_path / "b", stop=2)
    assert first.global_step == 2
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    want, got = flat_numpy(straight.state.params), flat_numpy(resumed.state.params)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["reward"] for r in b] == [r["reward"] for r in a]


# -- rollout_func -------------------------------------------------------------------------------


def _plain_rollout(prompts, trainer):
    """A rollout_func over the built-in sampler: one completion per given prompt."""
    tok = trainer.processing_class
    ids = [tok.encode(p) for p in prompts]
    G = trainer.args.num_generations
    roll = rollout(
        trainer.state.params,
        trainer.generation_key,
        ids[::G],
        model=trainer.model,
        sampling=trainer.sampling,
    )
    n = np.array(roll.completion_lengths)
    comp = [np.array(roll.completion_ids[i, : n[i]]).tolist() for i in range(len(prompts))]
    lps = [np.array(roll.logprobs[i, : n[i]]).tolist() for i in range(len(prompts))]
    return {"prompt_ids": ids, "completion_ids": comp, "logprobs": lps}


def test_rollout_func_required_keys_only_equals_the_built_in_generation(tiny_model_dir, tmp_path):
    def sevens(completions, **kwargs):
        return [sum(ch == "7" for ch in c) / max(len(c), 1) for c in completions]

    data = [{"prompt": p} for p in ["a", "b", "cd", "efg", "hi", "jk", "lmn", "op"]]
    args = dict(
        max_steps=3,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=6,
        learning_rate=1e-2,
        num_iterations=2,
    )
    plain = GRPOTrainer(
        str(tiny_model_dir), sevens, args=tiny_args(tmp_path / "a", **args), train_dataset=data
    )
    plain.train()
    custom = GRPOTrainer(
        str(tiny_model_dir),
        sevens,
        args=tiny_args(tmp_path / "b", **args),
        train_dataset=data,
        rollout_func=_plain_rollout,
    )
    custom.train()
    for k, v in flat_numpy(plain.state.params).items():
        np.testing.assert_allclose(flat_numpy(custom.state.params)[k], v, atol=1e-6, err_msg=k)
    assert [r["reward"] for r in custom.log_history] == [r["reward"] for r in plain.log_history]


def test_rollout_func_optional_mask_and_extra_fields(tiny_model_dir, tmp_path):
    seen = {}

    def with_extras(prompts, trainer):
        out = _plain_rollout(prompts, trainer)
        out["env_mask"] = [[1] * len(c) for c in out["completion_ids"]]
        out["env_mask"][0] = [0] * len(out["completion_ids"][0])
        out["judge"] = [f"j{i}" for i in range(len(prompts))]
        out["logprobs"] = None
        return out

    def uses_judge(completions, judge, **kwargs):
        seen["judge"] = list(judge)
        return [float(len(c)) for c in completions]

    data = [{"prompt": p} for p in ["a", "b", "cd", "efg"]]
    trainer = GRPOTrainer(
        str(tiny_model_dir),
        uses_judge,
        args=tiny_args(tmp_path, max_steps=1, num_iterations=2),
        train_dataset=data,
        rollout_func=with_extras,
    )
    gen = trainer._generate(mx.random.key(0))
    assert seen["judge"] == [f"j{i}" for i in range(8)]
    mask = np.array(gen.windows[0].completion_mask[0])
    assert (mask[0] == 0).all() and mask[1].sum() > 0
    # logprobs=None: old log-probs were recomputed, so they are the policy's own (non-zero).
    assert (np.array(gen.windows[0].old_logprobs[0])[1][mask[1] > 0] != 0).all()


def test_rollout_func_missing_keys_are_named(tiny_model_dir, tmp_path):
    def broken(prompts, trainer):
        return {"prompt_ids": [[1]] * len(prompts), "completion_ids": [[2]] * len(prompts)}

    data = [{"prompt": p} for p in ["a", "b", "cd", "efg"]]
    trainer = GRPOTrainer(
        str(tiny_model_dir),
        reward_len,
        args=tiny_args(tmp_path, max_steps=1),
        train_dataset=data,
        rollout_func=broken,
    )
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        trainer.train()


# -------------------------------------------------------------- evaluate()


def test_evaluate_with_a_rollout_func_equals_the_built_in_evaluation(tiny_model_dir, tmp_path):
    def sevens(completions, **kwargs):
        return [sum(ch == "7" for ch in c) / max(len(c), 1) for c in completions]

    data = [{"prompt": p} for p in ["a", "b", "cd", "efg"]]
    args = dict(max_steps=1, num_generations=4, per_device_train_batch_size=8,
                max_completion_length=6, beta=0.04)  # fmt: skip
    plain = GRPOTrainer(
        str(tiny_model_dir), sevens, args=tiny_args(tmp_path / "a", **args), train_dataset=data
    )
    custom = GRPOTrainer(
        str(tiny_model_dir), sevens, args=tiny_args(tmp_path / "b", **args), train_dataset=data,
        rollout_func=_plain_rollout,
    )  # fmt: skip
    want, got = plain.evaluate(data), custom.evaluate(data)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert getattr(custom, "generation_key", None) is None  # the eval key was not left behind


def test_evaluate_runs_the_tool_loop_and_reports_tool_metrics(qwen, tmp_path):
    def policy(ctx, g):
        if not _first_turn(ctx):
            return "Done!"
        return [CALL.format("multiply", '{"a": 3, "b": 4}'), "no tool", "no tool"][g]

    trainer = _trainer(qwen, tmp_path, policy=policy, tools=[multiply], reward_funcs=reward_len)
    out = trainer.evaluate([{"prompt": [{"role": "user", "content": "hi"}]}] * 2)
    assert out["eval_tools/call_frequency"] == pytest.approx(1 / 3)
    assert out["eval_tools/calls/multiply"] == pytest.approx(1 / 3)
    assert out["eval_tools/failure_frequency"] == 0.0
    # Rows 0 end with "Done!" after the tool's answer, rows 1 and 2 with "no tool".
    assert out["eval_reward"] == pytest.approx((len("Done!") + 2 * len("no tool")) / 3)
    assert np.isfinite(out["eval_loss"])


def test_evaluate_with_an_environment_owned_reward(qwen, tmp_path):
    trainer = _trainer(
        qwen, tmp_path, policy=_counter_policy, environment_factory=ScoredCounter,
        train_dataset=None,
    )  # fmt: skip
    out = trainer.evaluate([{"prompt": [{"role": "user", "content": "count"}]}])
    # Of the 3 completions one increments by 1: the environment's reward is 1, 0, 0.
    assert out["eval_rewards/ScoredCounter/mean"] == pytest.approx(1 / 3)
    assert out["eval_tools/call_frequency"] == pytest.approx(2 / 3)
