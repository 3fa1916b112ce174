"""The built-in agentic task ``lookup``: a warm-started tiny model learns to call its tool."""

import json

import pytest

import grpo
from grpo import agent_tasks as A
from grpo.agent import ToolLoop
from grpo.tools import parse_tool_calls


def test_reward_needs_the_copied_code_in_the_last_assistant_message():
    called = [
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "tool", "name": "peek", "content": "xqz"},
        {"role": "assistant", "content": "xqz"},
    ]
    unanswered = called[:2]  # the tool's message alone earns nothing
    assert A.lookup_match([called, unanswered, called], ["xqz", "xqz", "xqa"]) == [1.0, 0.0, 2 / 3]


def test_demonstration_is_laid_out_as_the_tool_loop_renders_a_rollout(tmp_path):
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(A.build(tmp_path, config=A.LookupWarmStart(steps=0))))
    loop = ToolLoop(tokenizer)
    assert loop.format == "mistral"
    parts = A.demo_parts(loop, tokenizer)
    ids, mask = A.encode_demo(parts, tokenizer, "xqz", use_tool=True)
    text = tokenizer._tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith(
        "[TOOL_CALLS]peek{}<|im_end|><|im_start|>txqz<|im_end|><|im_start|>axqz<|im_end|>"
    )
    trained = tokenizer._tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "[TOOL_CALLS]peek{}<|im_end|>xqz<|im_end|>"  # both turns and their EOS
    assert parse_tool_calls("[TOOL_CALLS]peek{}", format="mistral")[1][0].name == "peek"
    tool = {"role": "tool", "name": "peek", "content": "xqz", "tool_call_id": "c00000000"}
    assert ids[len(parts[0]) + len(parts[1]) :][:-4] == loop.suffix_ids([tool])


def test_grpo_raises_the_reward_of_a_warm_started_model(tmp_path):
    """Seeded: the task's warm start, then 20 GRPO steps of its config; the mean reward of
    the last two logged steps beats the first two by a margin, and the tool is called more."""
    import mlx_lm

    path = A.build(tmp_path / "m", config=A.WARM_START)
    model, tokenizer = mlx_lm.load(str(path))
    overrides = {"output_dir": str(tmp_path / "out"), "max_steps": 20}
    args = grpo.GRPOConfig(**{**A.TRAIN_ARGS, **overrides}, disable_tqdm=True)
    trainer = grpo.GRPOTrainer(
        model, [A.lookup_match], args=args, train_dataset=A.make_dataset(),
        processing_class=tokenizer, environment_factory=A.Vault,
    )  # fmt: skip
    trainer.train()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "reward" in r]
    rewards = [r["reward"] for r in records]
    calls = [r["tools/call_frequency"] for r in records]
    assert len(rewards) == 10  # logged every 2 steps
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.05, rewards
    assert sum(calls[-2:]) > sum(calls[:2]), calls


def test_cli_resolves_the_task(monkeypatch):
    from grpo.cli import Run, build_parser

    args = build_parser().parse_args(["train", "--dataset", "lookup", "--warm_start_steps", "7"])
    run = Run(args, command="train")
    assert (run.task, run.agentic, run.reward) == ("lookup", True, "lookup_match")
    assert run.config.tool_call_format == "mistral" and run.config.max_completion_length == 40
    assert run.warm_start.steps == 7 and run.trainer_kwargs() == {"environment_factory": A.Vault}
    assert len(run.rows(split="train")) == A.DATASET_SIZE
    with pytest.raises(Exception, match="not available"):
        run.rows(split="eval")
