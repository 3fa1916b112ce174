"""Soak test (not in CI): many GRPO steps on the tiny model; memory stays flat, metrics finite.

Runs ``GRPOTrainer.train()`` unchanged on the default job's recipe (the ``reverse`` task,
full fine-tune of a seeded tiny Llama, ``G = 8``, ``beta = 0.01`` so the reference forward
runs) for ``--steps`` optimizer steps, and records from an ``on_step_end`` callback:

* ``mx.get_active_memory()`` and ``mx.get_peak_memory()`` at step 50, every ``--every``
  steps, and at the last step (peak is reset after step 50, so "peak after 50" is the
  high-water mark of the steady state only);
* every metric of every step; the run fails if ``loss``, ``grad_norm``, ``reward``, ``kl``,
  ``entropy`` or ``learning_rate`` is ever NaN/inf, and lists any other metric that was
  (some, like ``reward_std`` of a single value, are NaN by TRL's definition).

    .venv/bin/python bench/soak.py                 # 1000 steps
    .venv/bin/python bench/soak.py --steps 200 --markdown docs/benchmarks.md

Warm start is skipped by default (``--warm-start-steps 0``): memory behaviour does not
depend on the weights, and the seeded model already gives non-uniform rewards often enough.
"""

from __future__ import annotations  # noqa: I001  (grpo before mlx: fast BLAS)

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpo  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

REQUIRED_FINITE = ("loss", "grad_norm", "reward", "kl", "entropy", "learning_rate")
MB = 1024 * 1024


class Recorder:
    def __init__(self, *, steps: int, every: int):
        self.steps, self.every = steps, every
        self.memory: list[dict] = []
        self.bad_required: list[tuple[int, str, float]] = []
        self.nonfinite_other: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, step, metrics):
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                if name in REQUIRED_FINITE:
                    self.bad_required.append((step, name, value))
                else:
                    self.nonfinite_other[name] = self.nonfinite_other.get(name, 0) + 1
        if step == 50 or step % self.every == 0 or step == self.steps:
            self.memory.append(
                {
                    "step": step,
                    "active_mb": mx.get_active_memory() / MB,
                    "peak_mb": mx.get_peak_memory() / MB,
                    "elapsed_s": time.perf_counter() - self.t0,
                    "reward": metrics.get("reward"),
                }
            )
            print(json.dumps(self.memory[-1]), flush=True)
        if step == 50:
            mx.reset_peak_memory()


def run(args) -> dict:
    import grpo.tasks  # noqa: F401  (registers the "exact_match" reward)
    from grpo import default_job
    from grpo.io.tiny import build_tiny_model
    from grpo.trainer import GRPOTrainer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="grpo-soak-"))
    if args.warm_start_steps:
        ws = default_job.evolve_warm_start(steps=args.warm_start_steps)
        model_dir = default_job.ensure_model(work / "cache", warm_start=ws)
    else:
        model_dir = build_tiny_model(work / "model", size="test", seed=0)
    cfg = default_job.default_config(
        max_steps=args.steps,
        output_dir=str(work / "out"),
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=10,
        disable_tqdm=True,
    )
    dataset = default_job.default_dataset()
    rec = Recorder(steps=args.steps, every=args.every)
    trainer = GRPOTrainer(
        str(model_dir),
        "exact_match",  # the reverse task's reward (grpo.tasks)
        args=cfg,
        train_dataset=dataset,
        callbacks=[rec],
        group=None,
    )
    trainer.train()
    first = next(m for m in rec.memory if m["step"] == 50)
    last = rec.memory[-1]
    return {
        "steps": args.steps,
        "config": {
            k: getattr(cfg, k)
            for k in (
                "num_generations",
                "per_device_train_batch_size",
                "max_completion_length",
                "beta",
                "use_lora",
                "save_steps",
            )
        },
        "memory": rec.memory,
        "active_mb_step50": first["active_mb"],
        "active_mb_last": last["active_mb"],
        "peak_mb_step50": first["peak_mb"],
        "peak_mb_after50": last["peak_mb"],
        "required_metrics_finite": not rec.bad_required,
        "bad_required": rec.bad_required[:10],
        "nonfinite_other_metrics": rec.nonfinite_other,
        "wall_s": time.perf_counter() - rec.t0,
        "machine": f"{platform.machine()} {platform.system()}, load {os.getloadavg()[0]:.1f}",
    }


def markdown(res: dict) -> str:
    c = res["config"]
    rows = "\n".join(
        f"| {m['step']} | {m['active_mb']:.2f} | {m['peak_mb']:.2f} | {m['elapsed_s']:.0f} |"
        for m in res["memory"]
    )
    other = res["nonfinite_other_metrics"] or "none"
    finite = "yes" if res["required_metrics_finite"] else f"NO: {res['bad_required']}"
    return f"""
## Soak

`bench/soak.py --steps {res["steps"]}` runs `GRPOTrainer.train()` on the default job's recipe:
seeded tiny model (not warm-started), `reverse` task, `exact_match` reward,
{c["per_device_train_batch_size"]} rows per step (G = {c["num_generations"]}),
{c["max_completion_length"]} completion tokens, beta = {c["beta"]} (reference forward on),
{"LoRA" if c["use_lora"] else "full fine-tune"}, a checkpoint every {c["save_steps"]} steps
(keep 2). {res["machine"]} (2 shared cores); {res["wall_s"]:.0f} s wall.

| step | active MB | peak MB (reset after step 50) | elapsed s |
|---:|---:|---:|---:|
{rows}

- Active memory {res["active_mb_step50"]:.3f} MB at step 50 and {res["active_mb_last"]:.3f} MB at
  step {res["steps"]}; peak {res["peak_mb_step50"]:.3f} MB up to step 50 and
  {res["peak_mb_after50"]:.3f} MB over steps 51-{res["steps"]}: no growth.
- `loss`, `grad_norm`, `reward`, `kl`, `entropy`, `learning_rate` finite at every step:
  {finite}. Other metrics ever non-finite: {other}.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100, help="memory sample interval (steps)")
    p.add_argument("--save-steps", type=int, default=250, help="checkpoints during the run")
    p.add_argument("--warm-start-steps", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--markdown", default=None, help="append a '## Soak' section to this file")
    args = p.parse_args(argv)
    if args.steps < 50:
        p.error("--steps must be >= 50 (memory is compared at step 50)")
    res = run(args)
    print(json.dumps({k: v for k, v in res.items() if k != "memory"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(res))
    return 0 if res["required_metrics_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
