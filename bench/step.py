"""GRPO step-time breakdown on seeded tiny/small models, through GRPOTrainer's own code path.

For each cell of the grid (model size x prompts per step ``B`` x completion tokens ``T`` x
LoRA / full fine-tune) this builds a seeded model (``build_tiny_model``, loaded with
``mlx_lm.load`` from a temp dir), a :class:`grpo.GRPOTrainer` with ``G = 8`` completions
per prompt, one optimizer step per generation batch (``per_device_train_batch_size = B*G``)
and ``beta = 0.04`` (so the reference forward runs), and forces fixed-length completions
(EOS ids removed from the sampling config), so every step does the same work.

``trainer.train()`` runs unchanged; the phases are timed by wrapping the functions it calls,
each closed by an ``mx.eval`` of its outputs (MLX is lazy, so an unevaluated phase would be
billed to the next one):

* ``rollout``   - ``grpo.trainer.rollout`` (prefill + token loop), evaluated;
* ``scoring``   - ``GRPOTrainer._score`` (decode, reward functions, advantages);
* ``ref``       - ``GRPOTrainer._per_micro`` (reference log-probs, one forward);
* ``update``    - ``GRPOTrainer._step`` (compiled loss + backward + AdamW, evaluated);
* ``other``     - the rest of the step (prompt sampling, padding, packing, logging).

Per cell it reports medians over the measured steps (after ``--warmup`` steps that include
compilation), completion tokens/s, peak memory (``mx.get_peak_memory``) over the measured
steps, active memory after each step, and how many times the compiled train step and
log-prob function were traced (``compiles``; 1 each means no recompiles).

    .venv/bin/python bench/step.py                          # full grid
    .venv/bin/python bench/step.py --sizes tiny --tokens 64 --modes lora --steps 5
    .venv/bin/python bench/step.py ... --json out.json --markdown docs/benchmarks.md

The machine has 2 cores shared with other jobs: ``uptime`` load is recorded before and after
every cell.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import grpo  # noqa: F401  (loads the fast BLAS; must precede mlx)
import attrs
import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

# isort: on
from workload import PROMPT_CHARS, G, digit_fraction, prompt_texts

import grpo.trainer as trainer_mod
from grpo.config import GRPOConfig
from grpo.core import fastmath
from grpo.io.fast_attention import DEFAULT_BLOCK, install_fast_kernels  # noqa: F401  (bench/ab.py)
from grpo.io.tiny import build_tiny_model
from grpo.trainer import GRPOTrainer

PHASES = ("rollout", "scoring", "ref", "update")


def digit_reward(completions, **_):
    return digit_fraction(completions)


def prompts(n: int, *, seed: int = 0) -> list[dict]:
    return [{"prompt": text} for text in prompt_texts(n, seed=seed)]


def make_config(*, B: int, T: int, lora: bool, steps: int, out: str, **extra) -> GRPOConfig:
    return GRPOConfig(
        num_generations=G,
        max_completion_length=T,
        max_prompt_length=None,
        per_device_train_batch_size=B * G,
        gradient_accumulation_steps=1,
        beta=0.04,
        use_lora=lora,
        lora_rank=8,
        learning_rate=1e-5,
        max_steps=steps,
        seed=0,
        output_dir=out,
        logging_steps=10**9,
        save_steps=10**9,
        disable_tqdm=True,
        **extra,
    )


class Probe:
    """Wraps the trainer's phase functions with mx.eval-bounded timers and trace counters."""

    def __init__(self, tr: GRPOTrainer):
        self.tr = tr
        self.acc = dict.fromkeys(PHASES, 0.0)
        self.traces = {"train_step": 0, "logprobs": 0}
        self.rows: list[dict] = []
        self._last = None
        self._patch()

    def _timed(self, phase, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            tic = time.perf_counter()
            out = fn(*args, **kwargs)
            mx.eval(out if phase != "scoring" else out[0])
            self.acc[phase] += time.perf_counter() - tic
            return out

        return wrapper

    def _counted(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.traces[name] += 1  # runs only while mx.compile traces
            return fn(*args, **kwargs)

        return wrapper

    def _patch(self):
        tr = self.tr
        self._rollout = trainer_mod.rollout
        trainer_mod.rollout = self._timed("rollout", self._rollout)
        tr._score = self._timed("scoring", tr._score)
        tr._per_micro = self._timed("ref", tr._per_micro)
        tr._step = self._timed("update", tr._step)
        # Rebuild the compiled functions exactly as __init__ does, around counting wrappers.
        tr._loss_fn = self._counted("train_step", tr._loss_fn)
        tr._logprobs_fn = self._counted("logprobs", tr._logprobs_fn)
        tr._train_step = tr._build_step()
        tr._logprobs = mx.compile(tr._logprobs_fn)
        tr.callbacks.append(self)

    def restore(self):
        trainer_mod.rollout = self._rollout

    # -- callback --
    def on_train_begin(self, tr):
        mx.eval(tr.state)
        self._last, self._cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, tr, step, values):
        now = time.perf_counter()
        cpu = time.process_time()
        row = {"step": step, "total": now - self._last, "cpu": cpu - self._cpu, **self.acc}
        row["other"] = row["total"] - sum(self.acc[p] for p in PHASES)
        row["active_mb"] = mx.get_active_memory() / 2**20
        row["peak_mb"] = mx.get_peak_memory() / 2**20
        self.rows.append(row)
        self.acc = dict.fromkeys(PHASES, 0.0)
        if step == self.reset_peak_at:
            mx.reset_peak_memory()
        self._last, self._cpu = time.perf_counter(), time.process_time()

    reset_peak_at = 0


def load_model(path: Path):
    model, tok = mlx_lm.load(str(path))
    return model, tok


def run_cell(
    model_dir: Path,
    *,
    size,
    B,
    T,
    mode,
    steps,
    warmup,
    extra=None,
    tmp,
    attention_block=None,
    kernels=True,
    prompt_share=None,
) -> dict:
    """Train ``warmup + steps`` steps; medians over the last ``steps``."""
    model, tok = load_model(model_dir)
    out = os.path.join(tmp, f"out-{size}-{B}-{T}-{mode}")
    cfg = make_config(B=B, T=T, lora=mode == "lora", steps=warmup + steps, out=out, **(extra or {}))
    tr = GRPOTrainer(model, digit_reward, args=cfg, train_dataset=prompts(64 * B),
                     processing_class=tok, group=None)  # fmt: skip
    # Fixed-length completions: no EOS, so every step samples exactly T tokens per row.
    tr.sampling = attrs.evolve(tr.sampling, eos_ids=(), stop_sequences=())
    # attention_block=0: no block-causal split; kernels=False: mlx's own exp/softmax/
    # attention/SwiGLU everywhere (bench/ab.py attention / kernels).
    fastmath.POLYNOMIAL = kernels
    block = DEFAULT_BLOCK if attention_block is None else (attention_block or None)
    install_fast_kernels(tr.model, block=block, enabled=kernels)
    if prompt_share is not None:  # bench/ab.py share: 1 = the packed forward
        tr.loss_config = attrs.evolve(tr.loss_config, prompt_share=prompt_share)
    probe = Probe(tr)
    probe.reset_peak_at = warmup
    load_before = os.getloadavg()[0]
    mx.reset_peak_memory()
    try:
        tr.train()
    finally:
        probe.restore()
    load_after = os.getloadavg()[0]
    measured = probe.rows[warmup:]
    med = {k: statistics.median(r[k] for r in measured) for k in (*PHASES, "other", "total", "cpu")}
    n_completion = B * G * T
    result = {
        "size": size,
        "B": B,
        "G": G,
        "T": T,
        "mode": mode,
        "steps": len(measured),
        "warmup": warmup,
        "params_trainable": sum(v.size for _, v in tree_flatten(tr.state.params)),
        "median_s": med,
        "non_rollout_frac": 1 - med["rollout"] / med["total"],
        "completion_tok_s": n_completion / med["total"],
        "peak_mb": max(r["peak_mb"] for r in measured),
        "active_mb": [round(r["active_mb"], 2) for r in probe.rows],
        "first_step_s": probe.rows[0]["total"],
        "compiles": dict(probe.traces),
        "load_before": load_before,
        "load_after": load_after,
        "extra": extra or {},
        "attention_block": attention_block,
    }
    del tr, model
    mx.clear_cache()
    return result


def logprob_memory(V: int, *, N: int = 8, T: int = 256, dtype=mx.bfloat16) -> dict:
    """Peak memory of log-probs (+ backward) from ``[N, T, V]`` logits, chunked vs not.

    The logits are allocated and evaluated first; the figure is the peak *above* them, i.e.
    the temporaries of the log-prob path (a float32 ``[N, T, V]`` copy is ``4 N T V`` bytes).
    """
    from grpo.core.logprobs import token_logprobs

    out = {"V": V, "N": N, "T": T, "dtype": str(dtype), "f32_NTV_mb": 4 * N * T * V / 2**20}
    for name, chunk in (("chunked", None), ("unchunked", N * T * V + 1)):
        logits = (mx.random.normal((N, T, V), key=mx.random.key(0)) * 3).astype(dtype)
        tokens = mx.random.randint(0, V, (N, T), key=mx.random.key(1))
        mx.eval(logits, tokens)
        kwargs = {} if chunk is None else {"max_chunk_elements": chunk}

        def loss(z, kwargs=kwargs, tokens=tokens):
            return token_logprobs(z, tokens, **kwargs).sum()

        mx.reset_peak_memory()
        base = mx.get_active_memory()
        tic = time.perf_counter()
        mx.eval(mx.value_and_grad(loss)(logits))
        out[f"{name}_s"] = time.perf_counter() - tic
        # The gradient itself is one [N, T, V] array in the logits' dtype; count it apart.
        out[f"{name}_peak_above_logits_mb"] = (mx.get_peak_memory() - base) / 2**20
        del logits, tokens
        mx.clear_cache()
    out["grad_mb"] = N * T * V * (2 if dtype == mx.bfloat16 else 4) / 2**20
    return out


def environment() -> dict:
    import mlx_lm as _lm

    blas = grpo.blas_info() if hasattr(grpo, "blas_info") else {}
    return {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": _lm.__version__,
        "blas": blas.get("backend", "?"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _note(r: dict) -> str:
    notes = [f"{k}={v}" for k, v in (r.get("extra") or {}).items()]
    if r.get("attention_block") is not None:
        notes.append(f"attention_block={r['attention_block'] or 'off'}")
    return ", ".join(notes)


def markdown(results: list[dict], env: dict, *, title: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"{env['date']}; {env['processor']} ({env['cpus']} cores, {env['machine']}); "
        f"Python {env['python']}, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}, BLAS {env['blas']}. "
        f"G = {G}, {PROMPT_CHARS}-token prompts, fixed-length completions, beta = 0.04, "
        "one optimizer step per generation batch. Seconds are medians over the measured "
        "steps; `load` is the 1-min load average before -> after the cell (other helpers "
        "shared the 2 cores).",
        "",
        "| model | mode | B | T | steps | step s | CPU s | rollout | scoring | ref | update "
        "| other | non-rollout | compl. tok/s | peak MB | compiles | load | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["median_s"]
        c = r["compiles"]
        lines.append(
            f"| {r['size']} | {r['mode']} | {r['B']} | {r['T']} | {r['steps']} "
            f"| {m['total']:.3f} | {m['cpu']:.3f} | {m['rollout']:.3f} | {m['scoring']:.3f} | {m['ref']:.3f} "
            f"| {m['update']:.3f} | {m['other']:.3f} | {100 * r['non_rollout_frac']:.0f}% "
            f"| {r['completion_tok_s']:.0f} | {r['peak_mb']:.0f} "
            f"| {c['train_step']}/{c['logprobs']} "
            f"| {r['load_before']:.1f}->{r['load_after']:.1f} | {_note(r)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", nargs="+", default=["tiny", "small"], choices=["test", "tiny", "small"]
    )
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--tokens", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per cell")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps (compilation)")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="set GRPOConfig.gradient_checkpointing=True (if this build has it)",
    )
    ap.add_argument(
        "--attention-block",
        type=int,
        default=None,
        help="block-causal attention rows (0: mlx-lm's plain attention; default: "
        "what prepare_policy installs)",
    )
    ap.add_argument(
        "--logprob-memory",
        nargs="*",
        type=int,
        metavar="V",
        help="only measure the log-prob path's peak memory at these vocab sizes",
    )
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--markdown", help="append a markdown table to this file")
    ap.add_argument("--title", default="Step breakdown (bench/step.py)")
    args = ap.parse_args(argv)

    if args.logprob_memory is not None:
        rows = [logprob_memory(V) for V in (args.logprob_memory or [32768, 131072])]
        for r in rows:
            print(json.dumps(r))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return rows
    extra = {}
    if args.gradient_checkpointing:
        if "gradient_checkpointing" not in attrs.fields_dict(GRPOConfig):
            sys.exit("this build's GRPOConfig has no gradient_checkpointing field")
        extra["gradient_checkpointing"] = True
    env = environment()
    print(json.dumps(env))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model_dir = build_tiny_model(Path(tmp) / size, size=size, seed=0)
            for mode in args.modes:
                for B in args.batches:
                    for T in args.tokens:
                        r = run_cell(model_dir, size=size, B=B, T=T, mode=mode, steps=args.steps,
                                     warmup=args.warmup, extra=extra, tmp=tmp,
                                     attention_block=args.attention_block)  # fmt: skip
                        results.append(r)
                        m = r["median_s"]
                        print(
                            f"{size:5s} {mode:4s} B={B} T={T:3d}: step {m['total']:.3f}s "
                            + " ".join(f"{p}={m[p]:.3f}" for p in (*PHASES, "other"))
                            + f" non-rollout={100 * r['non_rollout_frac']:.0f}%"
                            f" tok/s={r['completion_tok_s']:.0f} peak={r['peak_mb']:.0f}MB"
                            f" compiles={r['compiles']}"
                            f" load={r['load_before']:.1f}->{r['load_after']:.1f}",
                            flush=True,
                        )
    payload = {"env": env, "args": vars(args), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
    table = markdown(results, env, title=args.title)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)
    return payload


if __name__ == "__main__":
    main()
