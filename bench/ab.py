"""Before/after (A/B) of one optimisation on a bench/step.py cell, arms interleaved.

    OPENBLAS_NUM_THREADS=1 /work/venv/bin/python bench/ab.py attention --size tiny --B 4 --T 256
    OPENBLAS_NUM_THREADS=1 /work/venv/bin/python bench/ab.py logprobs --old-commit ef780bf ...
    OPENBLAS_NUM_THREADS=1 /work/venv/bin/python bench/ab.py checkpointing ...

Arms alternate ``--rounds`` times (A, B, A, B, ...) in one process so load from other jobs
hits both alike; each arm is a full ``bench/step.py`` cell (``GRPOTrainer.train()``). With
one BLAS thread the process CPU time is the work done (no spin-waiting), which other jobs
on the machine barely change; it is reported next to wall time.

* ``attention``: grpo's attention without (A) and with (B) the block-causal split.
* ``logprobs``: ``grpo.core.logprobs`` as of ``--old-commit`` (A, loaded with ``git show``)
  vs the working tree (B).
* ``checkpointing``: ``gradient_checkpointing`` off (A) vs on (B).
* ``share``: the packed training forward (A) vs each prompt run once per group (B,
  ``grpo.core.shared_prefix``).
* ``kernels``: mlx's own CPU exp/softmax/attention/SwiGLU (A) vs grpo's
  (``grpo.core.fastmath`` + ``install_fast_kernels``, with the shared-prefix decode) (B).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step as S  # noqa: E402  (bench/step.py; imports grpo first for the BLAS)

import grpo.core.forward as forward_mod  # noqa: E402
import grpo.core.logprobs as current_logprobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _old_logprobs(commit: str, tmp: str):
    src = subprocess.run(
        ["git", "show", f"{commit}:grpo/core/logprobs.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tmp) / "old_logprobs.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _use_logprobs(module):
    forward_mod.token_logprobs = module.token_logprobs
    forward_mod.token_logprobs_and_entropy = module.token_logprobs_and_entropy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["attention", "logprobs", "checkpointing", "kernels", "share"])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--mode", default="full", choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--old-commit", default="ef780bf")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = S.build_tiny_model(Path(tmp) / args.size, size=args.size, seed=0)
        old = _old_logprobs(args.old_commit, tmp) if args.what == "logprobs" else None
        for _ in range(args.rounds):
            for arm in ("A", "B"):
                kwargs = {}
                if args.what == "attention":
                    kwargs["attention_block"] = 0 if arm == "A" else S.DEFAULT_BLOCK
                elif args.what == "checkpointing":
                    kwargs["extra"] = {"gradient_checkpointing": arm == "B"}
                elif args.what == "kernels":
                    kwargs["kernels"] = arm == "B"
                elif args.what == "share":
                    kwargs["prompt_share"] = None if arm == "B" else 1
                else:
                    _use_logprobs(old if arm == "A" else current_logprobs)
                r = S.run_cell(model_dir, size=args.size, B=args.B, T=args.T, mode=args.mode,
                               steps=args.steps, warmup=args.warmup, tmp=tmp, **kwargs)  # fmt: skip
                r["arm"] = arm
                rows.append(r)
                m = r["median_s"]
                print(f"{args.what} {arm}: step {m['total']:.3f}s cpu {m['cpu']:.3f}s "
                      f"ref {m['ref']:.3f} update {m['update']:.3f} rollout {m['rollout']:.3f} "
                      f"peak {r['peak_mb']:.0f}MB load {r['load_before']:.1f}->{r['load_after']:.1f}",
                      flush=True)  # fmt: skip
        _use_logprobs(current_logprobs)
    for arm in ("A", "B"):
        mine = [r for r in rows if r["arm"] == arm]
        med = {k: statistics.median(r["median_s"][k] for r in mine)
               for k in ("total", "cpu", "ref", "update", "rollout")}  # fmt: skip
        peak = max(r["peak_mb"] for r in mine)
        print(f"{arm}: " + " ".join(f"{k}={v:.3f}" for k, v in med.items()) + f" peak={peak:.0f}MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
