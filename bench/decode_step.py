"""Where rollout time goes: prefill vs per-step decode, for grpo's layouts and for mlx-lm.

    .venv/bin/python bench/decode_step.py [--sizes tiny small] [--repeats 4]

One prompt of 128 tokens, G = 8 rows, 64 tokens, temperature 1 (B = 1 of bench/rollout.py).
Arms, each on a freshly loaded model (so each traces its own compiled step):

* ``fast + shared``: grpo's CPU kernels and the shared-prefix decode cache (the default);
* ``fast, per-row``: grpo's kernels, prompt keys/values gathered into every row;
* ``mlx kernels``: mlx's own exp/softmax/attention/SwiGLU, per-row layout (before);
* ``mlx-lm``: ``BatchGenerator`` (mlx-lm's batched generation), first token and median
  time between tokens.

Prefill = prompt forward until the first logits; per-step = (total - prefill) / 63.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# isort: off
import grpo  # noqa: F401  (loads the fast BLAS; must precede the first mlx import)

# isort: on
import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from grpo.core import fastmath
from grpo.core import rollout as R
from grpo.core.sampling import SamplingConfig
from grpo.io.fast_attention import install_fast_kernels
from grpo.io.tiny import build_tiny_model

G, T, P = 8, 64, 128
ARMS = ("fast + shared", "fast, per-row", "mlx kernels")


def time_arm(path, arm, prompts, repeats):
    model, _ = mlx_lm.load(str(path))
    fast = arm != "mlx kernels"
    fastmath.POLYNOMIAL = fast
    install_fast_kernels(model, enabled=fast)
    shared = arm == "fast + shared"
    original_shares, original_prefill = R.shares_prefix, R._prefill
    prefill_s = []

    def timed_prefill(*a, **k):
        tic = time.perf_counter()
        out = original_prefill(*a, **k)
        mx.eval(out[1])
        prefill_s.append(time.perf_counter() - tic)
        return out

    R.shares_prefix, R._prefill = (lambda m: shared), timed_prefill
    cfg = SamplingConfig(group_size=G, max_tokens=T, temperature=1.0, eos_ids=())
    totals = []
    try:
        for i in range(repeats + 1):  # the first call compiles
            tic = time.perf_counter()
            mx.eval(rollout_once(model, prompts, cfg, i))
            totals.append(time.perf_counter() - tic)
    finally:
        R.shares_prefix, R._prefill = original_shares, original_prefill
        fastmath.POLYNOMIAL = True
    total, pre = statistics.median(totals[1:]), statistics.median(prefill_s[1:])
    return total, pre, (total - pre) / (T - 1)


def rollout_once(model, prompts, cfg, seed):
    return R.rollout(model.parameters(), mx.random.key(seed), prompts, model=model, sampling=cfg)


def time_mlx_lm(path, prompts, repeats):
    model, _ = mlx_lm.load(str(path))
    install_fast_kernels(model, enabled=False)
    rows = [p for p in prompts for _ in range(G)]
    firsts, steps, totals = [], [], []
    for _ in range(repeats + 1):
        gen = BatchGenerator(model, max_tokens=T, stop_tokens=None, sampler=make_sampler(temp=1.0),
                             completion_batch_size=len(rows), prefill_batch_size=len(rows))  # fmt: skip
        gen.insert(rows, [T] * len(rows))
        tic, times = time.perf_counter(), []
        while gen.next_generated():
            times.append(time.perf_counter())
        gen.close()
        firsts.append(times[0] - tic)
        steps.append(float(np.median(np.diff(times))))
        totals.append(times[-1] - tic)
    med = statistics.median
    return med(totals[1:]), med(firsts[1:]), med(steps[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"B=1 G={G} T={T} P={P} OPENBLAS_NUM_THREADS={threads} load={os.getloadavg()[0]:.2f}")
    print("| model | engine | total s | prefill s | decode ms/step |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 97, size=P).tolist()]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = build_tiny_model(os.path.join(tmp, size), size=size, seed=0)
            for arm in ARMS:
                total, pre, step = time_arm(path, arm, prompts, args.repeats)
                print(
                    f"| {size} | {arm} | {total:.3f} | {pre:.3f} | {1e3 * step:.2f} |", flush=True
                )
            total, first, step = time_mlx_lm(path, prompts, args.repeats)
            print(f"| {size} | mlx-lm | {total:.3f} | {first:.3f} | {1e3 * step:.2f} |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
