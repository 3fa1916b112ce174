"""Rollout throughput: grpo's `rollout` vs mlx-lm batch generation vs mlx-lm-lora's GRPO rollout.

Builds seeded models (``build_tiny_model(size="tiny" | "small")``) in a temp dir, loads them
through ``mlx_lm.load``, and generates G = 8 completions of exactly 64 tokens (EOS ignored,
so every engine produces the same token count) for B in {1, 4} random 128-token prompts.
Each engine is warmed up once, then timed ``--repeats`` times, interleaved so machine load
hits all engines alike; the median is reported as tokens/s (completion tokens / wall time,
prefill included). Ratios per CPU-second (process CPU time, all threads) are printed too:
on a machine shared with other jobs they are steadier than wall-clock ratios.

    .venv/bin/python bench/rollout.py [--sizes tiny small] [--batches 1 4] [--repeats 3] \
        [--hf-python .venv-trl/bin/python]
    .venv/bin/python bench/rollout.py --breakdown [--sizes tiny small] [--hf-python ...]
    .venv/bin/python bench/rollout.py --realistic [--sizes tiny small] [--slots 16 32 64]

``--hf-python``: a Python with torch and transformers runs transformers' ``generate``
(bench/peers/hf_generate.py, a persistent worker process loading the same directory with
``AutoModelForCausalLM``, float32, as many threads as grpo's BLAS: ``OPENBLAS_NUM_THREADS``
or 2, set as ``OMP/OPENBLAS/MKL_NUM_THREADS`` and ``torch.set_num_threads``) as one more
interleaved engine; its times are measured inside the worker around the ``generate``
call. ``--breakdown``: at B = 1, where one rollout of grpo and one ``generate`` go
(prefill, decode per token, forward + sampling, sampling alone, the rest).

``--realistic``: B = 8 prompts x G = 8 rows, at most 256 tokens, each row's length pre-drawn
from a long-tailed (log-normal) distribution and enforced in every engine: grpo's
continuous-batching engine (``decode_continuous``: each row stops at its drawn length,
``S`` decode slots) and mlx-lm's ``BatchGenerator`` given all 64 rows (each row's drawn
length as its ``max_tokens``). mlx-lm-lora's ``generate_grpo`` takes one length for all
rows, so it cannot run this workload. tokens/s = generated tokens / wall time.

On the tiny model it also times finished-row compaction on vs off (EOS-heavy sampling).

``--quantization 8 4``: only grpo's ``rollout``, sampling from the float model vs from its
quantized copies (``rollout_quantization``: ``grpo.core.quantize``, group size 64) on the
same prompts and keys; tokens/s and the speed-up over float, per wall second and per
CPU-second, plus the time to re-quantize the weights (paid once per generation batch).

    .venv/bin/python bench/rollout.py --quantization 8 4 [--sizes tiny small medium]

mlx-lm-lora is optional (the ``bench`` extra); its column is skipped with a message when it
cannot be imported.
"""

from __future__ import annotations

import argparse
import functools
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
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from grpo.core.rollout import rollout
from grpo.core.sampling import SamplingConfig
from grpo.io.fast_attention import install_fast_kernels
from grpo.io.tiny import build_tiny_model

G, T, P = 8, 64, 128


def engine_rollout(model, tokenizer, prompts, seed, *, fast=True):
    # grpo's loaders install the CPU kernels; a bare mlx_lm.load model gets them here, and
    # the other engines take them out again so they run mlx-lm's own functions.
    install_fast_kernels(model, enabled=fast)
    cfg = SamplingConfig(group_size=G, max_tokens=T, temperature=1.0, eos_ids=())
    r = rollout(model.parameters(), mx.random.key(seed), prompts, model=model, sampling=cfg)
    mx.eval(r)
    assert r.completion_ids.shape == (len(prompts) * G, T)
    return r.completion_ids.size


_TWINS: dict = {}


def engine_rollout_mlx_kernels(model, tokenizer, prompts, seed):
    """rollout on mlx's own CPU kernels, on a twin of ``model`` (same weights) so its
    compiled decode step is traced without the fast kernels."""
    twin = _TWINS.get(id(model))
    if twin is None:
        twin = _TWINS[id(model)] = type(model)(model.args)
        twin.update(model.parameters())
        twin.eval()
    return engine_rollout(twin, tokenizer, prompts, seed, fast=False)


def engine_mlx_lm(model, tokenizer, prompts, seed):
    """mlx-lm's own batched generation (BatchGenerator, what batch_generate drives) of the B*G rows."""
    install_fast_kernels(model, enabled=False)
    rows = [p for p in prompts for _ in range(G)]
    mx.random.seed(seed)
    gen = BatchGenerator(model, max_tokens=T, stop_tokens=None, sampler=make_sampler(temp=1.0),
                         completion_batch_size=len(rows), prefill_batch_size=len(rows))  # fmt: skip
    n = 0
    try:
        gen.insert(rows, [T] * len(rows))
        while responses := gen.next_generated():
            n += len(responses)
    finally:
        gen.close()
    assert n == len(rows) * T, n
    return n


class _NoEosTokenizer:
    """mlx-lm-lora stops on ``tokenizer.eos_token_ids``; hide them to force full length."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_ids = []

    def encode(self, *a, **k):
        return self._tok.encode(*a, **k)

    def decode(self, *a, **k):
        return self._tok.decode(*a, **k)


def engine_mlx_lm_lora(model, tokenizer, prompts, seed):
    from mlx_lm_lora.trainer.grpo_trainer import generate_grpo

    install_fast_kernels(model, enabled=False)
    mx.random.seed(seed)
    completions, _, _ = generate_grpo(
        model, _NoEosTokenizer(tokenizer), [mx.array(p) for p in prompts], max_tokens=T,
        group_size=G, batch_size=len(prompts), end_token="", temperature=1.0, top_p=1.0,
        top_k=0, min_p=0.0,
    )  # fmt: skip
    n = sum(c.size for c in completions)
    assert n == len(prompts) * G * T, n
    return n


class HFWorker:
    """transformers' ``generate`` in a separate Python (bench/peers/hf_generate.py), one
    persistent process per model directory so its turns interleave with the others."""

    def __init__(self, python: str, model_dir: str, threads: int | None = None):
        import json
        import subprocess

        self._json = json
        # As many threads as grpo's BLAS gets (OPENBLAS_NUM_THREADS, else OpenBLAS's 2 here).
        threads = threads or int(os.environ.get("OPENBLAS_NUM_THREADS", "2"))
        env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}}
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "hf_generate.py")
        self.proc = subprocess.Popen(
            [python, script, model_dir, "--threads", str(threads)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hf_generate.py exited ({self.proc.wait()})")
        return self._json.loads(line)

    def ask(self, op: str, prompts, seed: int, tokens: int = T) -> dict:
        req = {"op": op, "prompts": prompts, "seed": seed, "G": G, "tokens": tokens}
        self.proc.stdin.write(self._json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def engine_transformers(worker: HFWorker):
    """transformers' generate of the B*G rows; times come from the worker (its own process)."""

    def run(model, tokenizer, prompts, seed):
        r = worker.ask("generate", prompts, seed)
        return r["n"], r["wall"], r["cpu"]

    return run


_QUANTIZED: dict = {}


def engine_quantized(model, tokenizer, prompts, seed, *, bits):
    """rollout from the ``bits``-bit copy of ``model`` (built and quantized once per model)."""
    from grpo.core.quantize import quantized_copy, quantized_params, rollout_group_size

    install_fast_kernels(model)
    if (id(model), bits) not in _QUANTIZED:
        group = rollout_group_size(model, None)
        copy = quantized_copy(model, bits=bits, group_size=group)
        params = quantized_params(model, model.parameters(), bits=bits, group_size=group)
        _QUANTIZED[id(model), bits] = (copy, params)
    copy, params = _QUANTIZED[id(model), bits]
    cfg = SamplingConfig(group_size=G, max_tokens=T, temperature=1.0, eos_ids=())
    r = rollout(params, mx.random.key(seed), prompts, model=copy, sampling=cfg)
    mx.eval(r)
    assert r.completion_ids.shape == (len(prompts) * G, T)
    return r.completion_ids.size


def requantize_seconds(model, bits, repeats=3) -> float:
    """Median wall time of re-quantizing every weight (what each generation batch pays)."""
    from grpo.core.quantize import quantized_params, rollout_group_size

    group = rollout_group_size(model, None)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        quantized_params(model, model.parameters(), bits=bits, group_size=group)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def bench_quantization(sizes, batches, bits_list, repeats):
    engines = {"float": engine_rollout}
    for bits in bits_list:
        engines[f"q{bits}"] = functools.partial(engine_quantized, bits=bits)
    q = [n for n in engines if n != "float"]
    print(f"G={G} T={T} P={P} blas={grpo.blas_info()['backend']} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| model | params | B | " + " | ".join(f"{n} tok/s" for n in engines)
          + " | " + " | ".join(f"{n} / float" for n in q)
          + " | " + " | ".join(f"{n} / float per CPU-s" for n in q)
          + " | " + " | ".join(f"re-quantize {n} (s)" for n in q) + " |")  # fmt: skip
    print("|" + "---|" * (3 + len(engines) + 3 * len(q)))
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = build_tiny_model(os.path.join(tmp, size), size=size, seed=0)
            model, tokenizer = mlx_lm.load(str(path))
            n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
            requant = {n: requantize_seconds(model, int(n[1:])) for n in q}
            for B in batches:
                tps, cps = bench_one(model, tokenizer, B, engines, repeats)
                cells = " | ".join(f"{tps[n]:.0f}" for n in engines)
                wall = " | ".join(f"{tps[n] / tps['float']:.2f}x" for n in q)
                cpu = " | ".join(f"{cps[n] / cps['float']:.2f}x" for n in q)
                rq = " | ".join(f"{requant[n]:.2f}" for n in q)
                print(f"| {size} | {n_params / 1e6:.1f}M | {B} | {cells} | {wall} | {cpu} | {rq} |",
                      flush=True)  # fmt: skip
            _QUANTIZED.clear()


def lora_available() -> str | None:
    try:
        import mlx_lm_lora.trainer.grpo_trainer  # noqa: F401
    except Exception as e:  # noqa: BLE001  (any import failure means "skip")
        return f"{type(e).__name__}: {e}"
    return None


def bench_one(model, tokenizer, B, engines, repeats):
    rng = np.random.default_rng(B)
    prompts = [rng.integers(3, 97, size=P).tolist() for _ in range(B)]
    wall = {name: [] for name in engines}
    cpu = {name: [] for name in engines}
    for fn in engines.values():
        fn(model, tokenizer, prompts, 0)  # warm-up (compiles, allocates)
    for rep in range(repeats):
        for name, fn in engines.items():
            tic, cpu_tic = time.perf_counter(), time.process_time()
            n = fn(model, tokenizer, prompts, rep + 1)
            took, took_cpu = time.perf_counter() - tic, time.process_time() - cpu_tic
            if isinstance(n, tuple):  # an engine in another process reports its own times
                n, took, took_cpu = n
            wall[name].append(n / took)
            cpu[name].append(n / took_cpu)
    med = statistics.median
    return {n: med(v) for n, v in wall.items()}, {n: med(v) for n, v in cpu.items()}


def bench_compaction(model, repeats):
    """Finished-row compaction on vs off: B=4, G=8, up to 128 tokens, 40 EOS ids (rows end
    at different steps). Sampled lengths differ between the arms, so CPU ms per generated
    token is reported alongside wall time."""
    from grpo.core import rollout as R

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=P).tolist() for _ in range(4)]
    cfg = SamplingConfig(group_size=G, max_tokens=128, eos_ids=tuple(range(100, 140)))
    default = R.FILTER_FRACTION
    res = {}
    try:
        for frac in (default, 0.0):
            R.FILTER_FRACTION = frac
            mx.eval(
                rollout(model.parameters(), mx.random.key(0), prompts, model=model, sampling=cfg)
            )
            walls, cpus, toks = [], [], []
            for rep in range(repeats):
                tic, cpu_tic = time.perf_counter(), time.process_time()
                r = rollout(
                    model.parameters(), mx.random.key(rep + 1), prompts, model=model, sampling=cfg
                )
                mx.eval(r)
                walls.append(time.perf_counter() - tic)
                cpus.append(time.process_time() - cpu_tic)
                toks.append(int(r.completion_lengths.sum()))
            res[frac] = (sum(walls), sum(cpus), sum(toks))
    finally:
        R.FILTER_FRACTION = default
    for frac, (w, c, n) in res.items():
        label = "on " if frac else "off"
        print(
            f"compaction {label}: {w:.2f} s wall, {c:.2f} s CPU, {n} tokens, {1e3 * c / n:.2f} CPU ms/token"
        )


# -- realistic workload: B = 8 prompts x G = 8, up to 256 tokens, long-tailed lengths ------

RB, RT = 8, 256


def realistic_lengths(seed: int = 0) -> np.ndarray:
    """Pre-drawn completion lengths of the ``RB * G`` rows: log-normal (median ~48 tokens,
    a long tail), clipped to ``[1, RT]``; every engine ends row ``r`` after ``L[r]`` tokens."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(48), 0.9, RB * G)), 1, RT).astype(int)


def realistic_continuous(model, tokenizer, prompts, lengths, seed, *, slots):
    from grpo.core.continuous import decode_continuous
    from grpo.core.rollout import _policy

    install_fast_kernels(model, enabled=True)
    # No sampled end id: rows end exactly at their pre-drawn lengths, as in BatchGenerator.
    cfg = SamplingConfig(group_size=G, max_tokens=RT, temperature=1.0, eos_ids=())
    key = mx.random.key(seed)
    lens = [len(p) for p in prompts]
    # As rollout_continuous does: sample in eval mode and restore the model's own weights
    # afterwards (the compiled step leaves its placeholders in the model).
    with _policy(model, model.parameters()):
        out = decode_continuous(model, prompts, lens, key, cfg, slots=slots, eos_at=lengths)
        mx.eval(out)
    return int(np.minimum(lengths, RT).sum())


def realistic_mlx_lm(model, tokenizer, prompts, lengths, seed):
    """BatchGenerator given all rows, each with its pre-drawn length as max_tokens."""
    install_fast_kernels(model, enabled=False)
    rows = [p for p in prompts for _ in range(G)]
    mx.random.seed(seed)
    gen = BatchGenerator(model, max_tokens=RT, stop_tokens=None, sampler=make_sampler(temp=1.0),
                         completion_batch_size=len(rows), prefill_batch_size=len(rows))  # fmt: skip
    n = 0
    try:
        gen.insert(rows, [int(x) for x in lengths])
        while responses := gen.next_generated():
            n += len(responses)
    finally:
        gen.close()
    return n


def bench_realistic(sizes, repeats, slot_choices):
    lengths = realistic_lengths()
    print(f"realistic: B={RB} G={G} max {RT} tokens, P={P}, lengths median "
          f"{int(np.median(lengths))} mean {lengths.mean():.1f} max {lengths.max()} "
          f"total {lengths.sum()}")  # fmt: skip
    engines = {f"grpo continuous S={s}": functools.partial(realistic_continuous, slots=s)
               for s in slot_choices}  # fmt: skip
    engines["mlx-lm BatchGenerator"] = realistic_mlx_lm
    rng = np.random.default_rng(RB)
    prompts = [rng.integers(3, 97, size=P).tolist() for _ in range(RB)]
    print("| model | " + " | ".join(f"{n} tok/s" for n in engines)
          + " | best grpo / mlx-lm | per CPU-s: best grpo / mlx-lm |")  # fmt: skip
    print("|" + "---|" * (len(engines) + 3))
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = build_tiny_model(os.path.join(tmp, size), size=size, seed=0)
            model, tokenizer = mlx_lm.load(str(path))
            wall, cpu = {n: [] for n in engines}, {n: [] for n in engines}
            for fn in engines.values():
                fn(model, tokenizer, prompts, lengths, 0)
            for rep in range(repeats):
                for name, fn in engines.items():
                    tic, cpu_tic = time.perf_counter(), time.process_time()
                    n = fn(model, tokenizer, prompts, lengths, rep + 1)
                    assert n == lengths.sum(), (name, n, lengths.sum())
                    wall[name].append(n / (time.perf_counter() - tic))
                    cpu[name].append(n / (time.process_time() - cpu_tic))
            cells = " | ".join(f"{statistics.median(wall[n]):.0f}" for n in engines)
            ratios = []
            for d in (wall, cpu):
                med = {n: statistics.median(v) for n, v in d.items()}
                best = max(v for n, v in med.items() if n.startswith("grpo"))
                ratios.append(f"{best / med['mlx-lm BatchGenerator']:.2f}x")
            print(f"| {size} | {cells} | {' | '.join(ratios)} |", flush=True)


def grpo_breakdown(model, prompts, repeats):
    """Where one grpo rollout of ``prompts`` (G rows each, T tokens) goes, as in
    bench/peers/hf_generate.py's breakdown: total, prefill, decode per token; ``call`` =
    the compiled step's Python call (argument flattening, trace lookup, graph build),
    ``compute`` = its evaluation (forward + sampling), ``sampling`` = the sampler alone on
    the rows' logits, ``other`` = decode - call - compute (the loop's own bookkeeping)."""
    from grpo.core import rollout as R
    from grpo.core.sampling import make_uniform_sample_fn
    from grpo.core.shared_prefix import prefix_sharing_verified

    install_fast_kernels(model, enabled=True)
    cfg = SamplingConfig(group_size=G, max_tokens=T, temperature=1.0, eos_ids=())
    params, lengths = model.parameters(), [len(p) for p in prompts]
    rows = mx.repeat(mx.arange(len(prompts)), G)
    step = R._compiled_step(model, cfg)
    res = {k: [] for k in ("total", "prefill", "call", "compute", "sampling")}
    for rep in range(repeats + 1):  # the first round traces
        tic = time.perf_counter()
        engine_rollout(model, None, prompts, rep)
        total = time.perf_counter() - tic
        tic = time.perf_counter()
        cache, logits = R._prefill(model, prompts, lengths)
        state = R._initial_state(
            cache, prompts, cfg, logits.shape[-1], shared=prefix_sharing_verified(model)
        )
        U = R.uniforms(mx.random.key(rep), len(rows), T)
        state, lp = R._compiled_first(cfg)(logits[rows], state, U[:, 0])
        mx.eval(state, lp)
        prefill = time.perf_counter() - tic
        P, calls, computes = cache[0].size(), [], []
        for t in range(1, T):
            state = R._grow(state, P + t - 1)
            t0 = time.perf_counter()
            state, lp = step(params, state, mx.array(P + t - 1, dtype=mx.int32), U[:, t])
            t1 = time.perf_counter()
            mx.eval(state, lp)
            calls.append(t1 - t0)
            computes.append(time.perf_counter() - t1)
        sample = mx.compile(make_uniform_sample_fn(cfg))
        z = mx.random.normal((len(rows), logits.shape[-1]))
        no_seen = mx.zeros((1, 1), mx.bool_)
        mx.eval(sample(z, no_seen, U[:, 0]))
        tic = time.perf_counter()
        for t in range(T):
            mx.eval(sample(z, no_seen, U[:, t]))
        if rep:
            res["total"].append(total)
            res["prefill"].append(prefill)
            res["call"].append(statistics.median(calls))
            res["compute"].append(statistics.median(computes))
            res["sampling"].append((time.perf_counter() - tic) / T)
    med = {k: statistics.median(v) for k, v in res.items()}
    med["decode"] = (med["total"] - med["prefill"]) / (T - 1)
    med["other"] = med["decode"] - med["call"] - med["compute"]
    return med


def print_breakdown(sizes, repeats, hf_python):
    # B = 1: one 128-token prompt, G = 8 rows of exactly T tokens.
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 97, size=P).tolist()]
    print("| model | engine | total ms | prefill ms | decode ms/token | of which: Python call | "
          "forward + sampling | sampling | other |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = build_tiny_model(os.path.join(tmp, size), size=size, seed=0)
            model, _ = mlx_lm.load(str(path))
            worker = HFWorker(hf_python, str(path)) if hf_python else None
            try:
                rounds = {"grpo rollout": [], "transformers generate": []}
                for rep in range(repeats):  # interleaved rounds
                    rounds["grpo rollout"].append(grpo_breakdown(model, prompts, 1))
                    if worker:
                        worker.ask("breakdown", prompts, 0)  # warm-up
                        r = worker.ask("breakdown", prompts, rep + 1)
                        r["call"], r["compute"] = float("nan"), r["forward"] + r["sampling"]
                        rounds["transformers generate"].append(r)
            finally:
                if worker:
                    worker.close()
            for name, rs in rounds.items():
                if not rs:
                    continue
                m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                cells = [m["total"], m["prefill"], m["decode"], m["call"], m["compute"],
                         m["sampling"], m["other"]]  # fmt: skip
                text = " | ".join("n/a" if c != c else f"{1e3 * c:.2f}" for c in cells)
                print(f"| {size} | {name} | {text} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compaction", action="store_true", help="skip the compaction on/off run")
    ap.add_argument("--ab", action="store_true",
                    help="also time rollout on mlx's own CPU kernels (install_fast_kernels off)")  # fmt: skip
    ap.add_argument("--realistic", action="store_true",
                    help="only the realistic workload (B=8, G=8, <= 256 tokens, long-tailed)")  # fmt: skip
    ap.add_argument("--slots", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--hf-python", metavar="PYTHON",
                    help="a Python with torch + transformers: adds transformers' generate "
                         "(bench/peers/hf_generate.py, grpo's thread count) as an engine")  # fmt: skip
    ap.add_argument("--breakdown", action="store_true",
                    help="only the per-token breakdown at B = 1 (grpo, and transformers with "
                         "--hf-python)")  # fmt: skip
    ap.add_argument("--quantization", nargs="+", type=int, default=None, metavar="BITS",
                    help="only float vs quantized-copy rollout (rollout_quantization), e.g. 8 4")  # fmt: skip
    args = ap.parse_args()
    if args.quantization:
        bench_quantization(args.sizes, args.batches, args.quantization, args.repeats)
        print(f"load after: {os.getloadavg()[0]:.2f}")
        return
    shape = "" if args.realistic else f"G={G} T={T} P={P} "
    print(f"{shape}blas={grpo.blas_info()['backend']} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.2f}")  # fmt: skip
    if args.realistic:
        bench_realistic(args.sizes, args.repeats, args.slots)
    elif args.breakdown:
        print_breakdown(args.sizes, args.repeats, args.hf_python)
    else:
        bench_fixed(args)
    print(f"load after: {os.getloadavg()[0]:.2f}")


def bench_fixed(args):
    engines = {"rollout": engine_rollout, "mlx-lm": engine_mlx_lm}
    if args.ab:
        engines["rollout, mlx kernels"] = engine_rollout_mlx_kernels
    why = lora_available()
    if why is None:
        engines["mlx-lm-lora"] = engine_mlx_lm_lora
    else:
        print(f"mlx-lm-lora skipped (install the `bench` extra): {why}")
    peers = ["mlx-lm", "mlx-lm-lora"] + (["transformers"] if args.hf_python else [])
    names = list(engines) + (["transformers"] if args.hf_python else [])
    header = ("| model | B | " + " | ".join(f"{n} tok/s" for n in names) + " | "
              + " | ".join(f"vs {o}" for o in peers) + " | per CPU-s: "
              + " | ".join(f"vs {o}" for o in peers) + " |")  # fmt: skip
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = build_tiny_model(os.path.join(tmp, size), size=size, seed=0)
            model, tokenizer = mlx_lm.load(str(path))
            worker = HFWorker(args.hf_python, str(path)) if args.hf_python else None
            arms = {**engines, **({"transformers": engine_transformers(worker)} if worker else {})}
            try:
                for B in args.batches:
                    tps, cps = bench_one(model, tokenizer, B, arms, args.repeats)
                    ratios = [f"{d['rollout'] / d[o]:.2f}x" if o in d else "skipped"
                              for d in (tps, cps) for o in peers]  # fmt: skip
                    cells = " | ".join(f"{tps[n]:.0f}" for n in arms)
                    print(f"| {size} | {B} | {cells} | {' | '.join(ratios)} |", flush=True)
            finally:
                if worker:
                    worker.close()
            if size == "tiny" and not args.no_compaction:
                bench_compaction(model, args.repeats)


if __name__ == "__main__":
    main()
