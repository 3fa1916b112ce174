"""Trunk forward / forward+backward time, softmax normalised before vs after ``p @ v``.

    .venv/bin/python bench/attention_ab.py [--rounds 2]

Seeded ``tiny`` model with grpo's CPU kernels; arms interleaved per shape: ``pre`` divides
every score by the row sum and then multiplies by ``v`` (what ``attention`` did first),
``post`` multiplies first and divides the ``[.., D]`` result (``_normalised``, current).
"""

from __future__ import annotations

import argparse
import tempfile
import time

# isort: off
import grpo  # noqa: F401  (loads the fast BLAS; must precede the first mlx import)

# isort: on
import mlx.core as mx
import mlx_lm

from grpo.core import fastmath
from grpo.io import fast_attention as FA
from grpo.io.tiny import build_tiny_model


def _pre(scores, values):
    return fastmath.softmax(scores, axis=-1).astype(values.dtype) @ values


def _ms(fn, *args, n=3):
    mx.eval(fn(*args))
    tic = time.perf_counter()
    for _ in range(n):
        mx.eval(fn(*args))
    return 1e3 * (time.perf_counter() - tic) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    post = FA._normalised
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = mlx_lm.load(str(build_tiny_model(tmp, size="tiny", seed=0)))
        FA.install_fast_kernels(model)
        params = model.trainable_parameters()

        def total(p, x):
            model.update(p)
            return model.model(x).sum()

        print("| rows x tokens | arm | forward ms | forward + backward ms |\n|---|---|---|---|")
        for N, L in ((32, 288), (8, 96)):
            x = mx.random.randint(3, 90, (N, L), key=mx.random.key(0))
            for _ in range(args.rounds):
                for name, fn in (("pre", _pre), ("post", post)):
                    FA._normalised = fn
                    fwd = _ms(mx.compile(total), params, x)
                    both = _ms(mx.compile(mx.grad(total)), params, x)
                    print(f"| {N} x {L} | {name} | {fwd:.0f} | {both:.0f} |", flush=True)
        FA._normalised = post


if __name__ == "__main__":
    main()
