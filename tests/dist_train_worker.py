"""End-to-end GRPO training scenarios for test_distributed.py (one process or one rank).

``python tests/dist_worker.py SCENARIO OUT_DIR MODEL_DIR PROMPTS_PER_RANK`` alone, or under
``mlx.launch -n 2``. Rollouts are made deterministic and independent of how prompts are
split across ranks: each prompt is rolled out on its own with a key derived from its token
ids, and padded to fixed shapes, so two ranks with ``B`` prompts each see exactly the rows
one process with ``2B`` prompts sees.
"""

from __future__ import annotations  # noqa: I001  (grpo must be imported before mlx)

import zlib
from pathlib import Path
from unittest import mock

import grpo  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

import grpo.trainer
from grpo.config import GRPOConfig
from grpo.core import distributed as D
from grpo.core.rollout import Rollout, rollout
from grpo.io.dist import assert_in_sync

GROUP_SIZE = 4
MAX_TOKENS = 8
PROMPT_PAD = 64  # a fixed prompt bucket, so every run compiles the same shapes
STEPS = 3
DATASET = [{"prompt": f"q{i} {'abcdefgh'[i % 8] * (1 + i % 3)}"} for i in range(16)]


def _pad(x: mx.array, width: int) -> mx.array:
    return mx.pad(x, [(0, 0), (0, width - x.shape[1])])


def per_prompt_rollout(params, key, prompts, *, model, sampling) -> Rollout:
    """Each prompt sampled alone with a key from its own ids (``key`` is ignored)."""
    parts = []
    for ids in prompts:
        own = mx.random.key(zlib.crc32(bytes(str(list(ids)), "ascii")))
        parts.append(rollout(params, own, [ids], model=model, sampling=sampling))
    if max(p.prompt_ids.shape[1] for p in parts) > PROMPT_PAD:
        raise ValueError(f"test prompts must fit PROMPT_PAD={PROMPT_PAD} tokens")
    widths = {"prompt_ids": PROMPT_PAD, "completion_ids": MAX_TOKENS, "logprobs": MAX_TOKENS,
              "completion_mask": MAX_TOKENS}  # fmt: skip
    fields = {}
    for name in Rollout._fields:
        xs = [getattr(p, name) for p in parts]
        if name in widths:
            xs = [_pad(x, widths[name]) for x in xs]
        fields[name] = mx.concatenate(xs, axis=0)
    return Rollout(**fields)


def distinct_chars(completions, **kwargs) -> list[float]:
    return [float(len(set(c))) + 0.1 * len(c) for c in completions]


def _raising_on_rank1(rank: int):
    calls = {"n": 0}

    def reward_that_breaks(completions, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            raise RuntimeError("reward function 'reward_that_breaks' failed on rank 1")
        return distinct_chars(completions)

    return reward_that_breaks


def config(out_dir: Path, prompts: int) -> GRPOConfig:
    return GRPOConfig(
        num_generations=GROUP_SIZE,
        per_device_train_batch_size=prompts * GROUP_SIZE,
        max_completion_length=MAX_TOKENS,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        scale_rewards="batch",
        loss_type="dapo",
        seed=3,
        output_dir=str(out_dir / "trainer"),
        logging_steps=1,
        save_steps=2,
        disable_tqdm=True,
    )


def run(name: str, group, out: dict, out_dir: Path, args: list[str]) -> None:
    model_dir, prompts = args[0], int(args[1])
    rank = D.rank(group)
    reward = _raising_on_rank1(rank) if name == "train_raise" else distinct_chars
    cfg = config(out_dir, prompts)
    with mock.patch.object(grpo.trainer, "rollout", per_prompt_rollout):
        trainer = grpo.trainer.GRPOTrainer(model_dir, [reward], args=cfg, train_dataset=DATASET)
        initial = {k: mx.array(v) for k, v in tree_flatten(trainer.state.params)}
        trainer.train()
    final = dict(tree_flatten(trainer.state.params))
    assert_in_sync(final, group=group)
    mx.savez(str(out_dir / f"params_rank{rank}.npz"), **final)
    out["moved"] = max(mx.abs(final[k] - initial[k]).max().item() for k in final)
    out["log"] = trainer.log_history
    out["world"] = D.world_size(group)
    # Resume from step 2 (each rank from its own sampler position) and redo step 3.
    with mock.patch.object(grpo.trainer, "rollout", per_prompt_rollout):
        again = grpo.trainer.GRPOTrainer(model_dir, [reward], args=cfg, train_dataset=DATASET)
        again.train(resume_from_checkpoint=str(Path(cfg.output_dir) / "checkpoint-2"))
    resumed = dict(tree_flatten(again.state.params))
    out["resume_diff"] = max(mx.abs(resumed[k] - final[k]).max().item() for k in final)
