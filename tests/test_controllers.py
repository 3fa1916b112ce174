"""TRL's between-step controllers: the adaptive entropy coefficient and TR-DPO reference sync."""

import math

import mlx.core as mx
import numpy as np
from helpers import PROMPTS, flat_numpy, tiny_args

import grpo  # noqa: F401
from grpo.core.controllers import applied_entropy_coef, sync_reference, update_entropy_coef
from grpo.io.logging import read_metrics
from grpo.trainer import GRPOTrainer


def lowercase(completions, **kwargs):
    return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in completions]


def test_entropy_controller_rule():
    kw = dict(target=1.0, delta=0.25, lo=0.0, hi=0.6)
    assert update_entropy_coef(0.5, 0.9, **kw) == 0.6  # at/below target: up, capped at hi
    assert update_entropy_coef(0.1, 1.0, **kw) == 0.35
    assert update_entropy_coef(0.1, 1.5, **kw) == 0.0  # above: down, floored at lo
    assert applied_entropy_coef(0.3, math.inf, target=1.0) == 0.0  # no measurement yet
    assert applied_entropy_coef(0.3, 0.4, target=1.0) == 0.3


def test_sync_reference_is_tr_dpo_mix():
    ref = {"w": mx.array([1.0, 2.0]), "b": [mx.array([4.0])]}
    pol = {"w": mx.array([3.0, 0.0]), "b": [mx.array([0.0])]}
    out = flat_numpy(sync_reference(ref, pol, alpha=0.25))
    np.testing.assert_allclose(out["w"], [1.5, 1.5])
    np.testing.assert_allclose(out["b.0"], [3.0])


def test_adaptive_entropy_in_a_run(tiny_model_dir, tmp_path):
    # entropy_target far above any entropy: the coefficient rises by delta every step, and a
    # step applies the coefficient the previous step left (none at step 1).
    args = tiny_args(tmp_path, use_adaptive_entropy=True, entropy_target=1e3,
                     entropy_coef_delta=0.01, entropy_coef=0.0, max_steps=4)  # fmt: skip
    GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS).train()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    np.testing.assert_allclose([r["entropy_coef"] for r in rows], [0.01, 0.02, 0.03, 0.04])
    assert rows[0]["loss"] == rows[0]["policy_loss"]
    for prev, r in zip(rows, rows[1:], strict=False):
        want = r["policy_loss"] - prev["entropy_coef"] * r["entropy"]
        assert abs(r["loss"] - want) < 1e-5, (r, want)
    assert not any(k.startswith("entropy/bonus") for r in rows for k in r)


def _ref_run(tiny_model_dir, out, **kw):
    args = tiny_args(out, use_lora=False, beta=0.04, sync_ref_model=True,
                     ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, max_steps=4,
                     save_steps=2, **kw)  # fmt: skip
    trainer = GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS)
    return trainer


def test_tr_dpo_reference_sync_and_resume(tiny_model_dir, tmp_path):
    trainer = _ref_run(tiny_model_dir, tmp_path / "a")
    init = flat_numpy(trainer.policy.ref_params)
    seen = {}

    class Record:
        def on_step_end(self, tr, step, metrics):
            seen[step] = flat_numpy(tr.state.params)

    trainer.callbacks.append(Record())
    trainer.train()
    got = flat_numpy(trainer.policy.ref_params)
    for name, r0 in init.items():
        want = 0.5 * (0.5 * r0 + 0.5 * seen[2][name]) + 0.5 * seen[4][name]
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    # Resuming from step 2 restores the synced reference and ends where the full run did.
    resumed = _ref_run(tiny_model_dir, tmp_path / "a")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    again = flat_numpy(resumed.policy.ref_params)
    for name in got:
        np.testing.assert_array_equal(again[name], got[name], err_msg=name)
