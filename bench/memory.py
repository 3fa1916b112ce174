"""Peak memory of a GRPO step at a real vocabulary and long completions, grpo vs peers.

One seeded Llama model with Qwen's vocabulary size (``build_tiny_model(size, vocab_size=
151936)``, tied embeddings, float32), one prompt of 32 tokens, ``G = 8`` completions of
exactly ``T`` tokens (synthetic ids, so every engine scores the same rows), beta = 0.04
(a reference forward), LoRA rank 8 on every linear layer or a full fine-tune, Adam.
Every cell runs in a fresh process (peak memory is per process) and prints one JSON line.

Engines:

- ``grpo``: ``GRPOTrainer``'s own functions on that batch: the reference log-probs
  (``_per_micro``), then two compiled optimizer steps (``_step``); the step's peak is the
  second one's (the first also compiles and creates the optimizer state). Its default
  geometry, 8 rows per micro-batch; ``grpo-1row``: 1 row per micro-batch and 8
  accumulated (what ``max_memory_gb`` picks when 8 do not fit, and mlx-lm-lora's geometry
  at one prompt per step).
- ``grpo-unchunked``: the same with the LM head in one chunk (``head_chunk_elements``
  huge), i.e. ``[N, T, V]`` logits and their gradient formed whole, as before the chunked
  head. Only run up to ``--unchunked-max-tokens`` (its memory grows like ``N * T * V``).
- ``mlx-lm-lora``: its ``grpo_loss`` under ``nn.value_and_grad`` through its own
  micro-batching (``_grpo_value_and_grad``, one completion at a time for one prompt, as
  ``train_grpo`` does), with a separately loaded reference model, then an Adam update.
  Needs ``mlx-lm-lora`` importable (``--lora-python``, e.g. a venv that has it).
- ``--rollout`` adds grpo's rollout of the same ``8 x T`` tokens (EOS off) as its own row.

Each cell measures two optimizer steps and reports the second's peak (``--one-step``: the
first's, which also compiles and allocates the optimizer state). Reported: ``mx.get_peak_memory()`` (bytes MLX allocated at the peak, weights included) of
the step, and the process's peak RSS (``ru_maxrss``).

    .venv/bin/python bench/memory.py --tokens 64 512 1024 2048 --modes lora full \\
        --lora-python .venv-lora/bin/python --json bench/results/memory.json \\
        --plot docs/memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The peers' Python (``--lora-python``) may not have grpo installed: the repo is its source.
sys.path.insert(1, str(HERE.parent))
from workload import PROMPT_CHARS, G, digit_fraction, memory_rows, prompt_texts  # noqa: E402

V_QWEN = 151_936
MiB = 1 << 20
# --one-step: report the first optimizer step's peak (it also compiles and creates the
# optimizer state, so it is >= the steady state's) and skip the second step.
ONE_STEP = os.environ.get("GRPO_BENCH_ONE_STEP") == "1"


def _rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- grpo


def grpo_cell(model_dir: str, *, mode: str, T: int, micro: int, chunk: int | None, gc: bool):
    import attrs
    import mlx.core as mx

    import grpo  # noqa: F401  (fast BLAS before mlx)
    from grpo.config import GRPOConfig
    from grpo.core.batch import LossBatch, pack
    from grpo.core.pipeline import micro_batches
    from grpo.trainer import GRPOTrainer

    out = tempfile.mkdtemp()
    cfg = GRPOConfig(
        output_dir=out,
        max_steps=2,
        num_generations=G,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=G // micro,
        max_completion_length=T,
        max_prompt_length=PROMPT_CHARS,
        beta=0.04,
        use_lora=mode == "lora",
        lora_rank=8,
        learning_rate=1e-5,
        gradient_checkpointing=gc,
        disable_tqdm=True,
        logging_steps=1,
    )
    texts = prompt_texts(G)
    tr = GRPOTrainer(
        model_dir,
        lambda completions, **_: digit_fraction(completions),
        args=cfg,
        train_dataset=[{"prompt": t} for t in texts],
        group=None,
    )
    if chunk is not None:
        tr.loss_config = attrs.evolve(tr.loss_config, head_chunk_elements=chunk)
        tr._train_step = tr._build_step()
    prompt, completions, advantages = memory_rows(T)
    prompts = mx.array([prompt] * G, dtype=mx.int32)
    lengths = mx.full((G,), PROMPT_CHARS, mx.int32)
    comp = mx.array(completions, dtype=mx.int32)
    batch = LossBatch(
        pack(prompts, lengths, comp), lengths, comp, mx.ones((G, T), mx.float32),
        mx.array(advantages),
    )  # fmt: skip
    mx.eval(batch)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    ref = tr._per_micro(tr._logprobs, tr.policy.ref_params, batch)
    ref_peak = mx.get_peak_memory()
    batch = batch._replace(ref_logprobs=ref)
    window = micro_batches(batch, micro=micro, K=G // micro)[0]
    t0 = time.perf_counter()
    tr._step(window)
    step_s = time.perf_counter() - t0
    first_peak = step_peak = mx.get_peak_memory()
    if not ONE_STEP:
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        tr._step(window)
        step_s = time.perf_counter() - t0
        step_peak = mx.get_peak_memory()
    return {
        "weights_mib": base / MiB,
        "ref_peak_mib": ref_peak / MiB,
        "first_step_peak_mib": first_peak / MiB,
        "peak_mib": max(step_peak, ref_peak) / MiB,
        "step_peak_mib": step_peak / MiB,
        "active_after_mib": mx.get_active_memory() / MiB,
        "step_s": step_s,
    }


def rollout_cell(model_dir: str, *, T: int):
    import attrs
    import mlx.core as mx

    import grpo  # noqa: F401
    from grpo.config import GRPOConfig
    from grpo.core.rollout import rollout
    from grpo.io.model import load_model

    model, tok = load_model(model_dir)
    model.eval()
    sampling = GRPOConfig(num_generations=G, max_completion_length=T).to_sampling_config()
    sampling = attrs.evolve(sampling, eos_ids=(), stop_sequences=())
    prompt, _, _ = memory_rows(T)
    mx.eval(model.parameters())
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    roll = rollout(model.parameters(), mx.random.key(0), [prompt], model=model, sampling=sampling)
    mx.eval(roll)
    return {
        "weights_mib": base / MiB,
        "peak_mib": mx.get_peak_memory() / MiB,
        "step_s": time.perf_counter() - t0,
        "tokens": int(mx.array(roll.completion_lengths).sum().item()),
    }


# ---------------------------------------------------------------------- mlx-lm-lora


def mlx_lm_lora_cell(model_dir: str, *, mode: str, T: int):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.grpo_trainer import _grpo_value_and_grad, grpo_loss

    import grpo  # noqa: F401  (only to load the same OpenBLAS before mlx)

    # grpo's import installs its CPU kernels in mlx-lm's Llama module; take them out so
    # mlx-lm-lora runs mlx-lm's own code.
    from grpo.io.fast_attention import install_fast_kernels

    install_fast_kernels(llama, enabled=False)
    model, _ = mlx_lm.load(model_dir)
    ref_model, _ = mlx_lm.load(model_dir)
    ref_model.freeze()
    if mode == "lora":
        model.freeze()
        lora = {"rank": 8, "scale": 20.0, "dropout": 0.0}
        linear_to_lora_layers(model, len(model.layers), lora)
    model.train()
    prompt, completions, advantages = memory_rows(T)
    batch = ([prompt], [[0]], ["p"], ["a"], None)
    comps = [mx.array(c, dtype=mx.int32) for c in completions]
    opt = optim.Adam(learning_rate=1e-5)
    loss_vg = nn.value_and_grad(model, grpo_loss)

    def step():
        (loss, _, _), grads = _grpo_value_and_grad(
            loss_vg, model, 1,
            ref_model=ref_model, batch=batch, completions=comps,
            completion_texts=["x"] * G, batch_indices=[0] * G,
            advantages=mx.array(advantages), reward_metrics={},
            beta=0.04, epsilon=0.2, epsilon_high=0.2, max_tokens=T,
            importance_sampling_level="token", grpo_loss_type="grpo",
        )  # fmt: skip
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)

    mx.eval(model.parameters(), ref_model.parameters())
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    step()
    if not ONE_STEP:
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        step()
    return {
        "weights_mib": base / MiB,
        "peak_mib": mx.get_peak_memory() / MiB,
        "step_peak_mib": mx.get_peak_memory() / MiB,
        "step_s": time.perf_counter() - t0,
    }


# -------------------------------------------------------------------------- driver


def child(args) -> None:
    # grpo first: importing it loads the fast OpenBLAS, which must happen before mlx is
    # imported (the cells below import mlx), or every matmul runs on a slow BLAS.
    import grpo  # noqa: F401

    engine, mode, T = args.child
    T = int(T)
    if engine == "grpo":
        r = grpo_cell(args.model_dir, mode=mode, T=T, micro=G, chunk=None, gc=args.gc)
    elif engine == "grpo-1row":
        r = grpo_cell(args.model_dir, mode=mode, T=T, micro=1, chunk=None, gc=args.gc)
    elif engine == "grpo-unchunked":
        r = grpo_cell(args.model_dir, mode=mode, T=T, micro=G, chunk=1 << 40, gc=args.gc)
    elif engine == "grpo-rollout":
        r = rollout_cell(args.model_dir, T=T)
    elif engine == "mlx-lm-lora":
        r = mlx_lm_lora_cell(args.model_dir, mode=mode, T=T)
    else:
        raise SystemExit(f"unknown engine {engine}")
    r.update(engine=engine, mode=mode, T=T, rss_mib=_rss_mib(), gc=args.gc)
    print("RESULT " + json.dumps(r), flush=True)


def run_child(python: str, model_dir: str, engine: str, mode: str, T: int, gc: bool) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--model-dir", model_dir,
           "--child", engine, mode, str(T)] + (["--gc"] if gc else [])  # fmt: skip
    if engine == "trl":
        cmd = [python, str(HERE / "peers" / "trl_memory.py"), model_dir, "--tokens", str(T)]
        cmd += (["--lora"] if mode == "lora" else []) + (["--gc"] if gc else [])
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"engine": engine, "mode": mode, "T": T, "gc": gc, "error": " | ".join(tail)}
    r = json.loads(lines[-1][len("RESULT ") :])
    r["load"] = [load, os.getloadavg()[0]]
    r["measured_step"] = 1 if ONE_STEP or os.environ.get("GRPO_BENCH_ONE_STEP") == "1" else 2
    return r


def _num(x) -> str:
    # TRL's cell has no MLX peak (PyTorch's CPU allocator keeps no peak counter).
    return "" if x is None else f"{x:.0f}"


def markdown(rows: list[dict]) -> str:
    # "step": which optimizer step's peak (2: the second, which starts with the optimizer
    # state resident; 1: --one-step, the first). Rows from before the column are --one-step.
    head = ("| T | mode | ckpt | engine | step | step peak MiB (mx) | peak RSS MiB | weights MiB | "
            "grpo (ckpt) / engine (mx peak) | grpo (ckpt) / engine (RSS) | s/step |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    out = [head]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['T']} | {r['mode']} | {'on' if r['gc'] else 'off'} | {r['engine']} "
                       f"| | error: {r['error'][:80]} | | | | | |")  # fmt: skip
            continue
        # Ratios against grpo at its default geometry (8 rows per micro-batch) for this
        # (T, mode): with gradient checkpointing (GRPOConfig's default, as TRL's) if run.
        grpo = [x for x in rows if x.get("engine") == "grpo" and x["T"] == r["T"]
                and x["mode"] == r["mode"] and "error" not in x]  # fmt: skip
        ref = max(grpo, key=lambda x: x["gc"], default=None)
        other = ref and r is not ref
        mx_peak = r.get("peak_mib")
        ratio = f"{ref['peak_mib'] / mx_peak:.2f}x" if other and mx_peak else ""
        rss_ratio = f"{ref['rss_mib'] / r['rss_mib']:.2f}x" if other else ""
        weights = r.get("weights_mib")
        out.append(
            f"| {r['T']} | {r['mode']} | {'on' if r['gc'] else 'off'} | {r['engine']} | "
            f"{r.get('measured_step', 1)} | {_num(mx_peak)} | {r['rss_mib']:.0f} | {_num(weights)} | {ratio} | {rss_ratio} | "
            f"{r['step_s']:.2f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Top: MLX's own peak counter (MLX engines); bottom: peak RSS (every engine, TRL too).
    keys = (("peak_mib", "step peak (GiB, mx.get_peak_memory)"), ("rss_mib", "peak RSS (GiB)"))
    series = sorted({(r["engine"], r["gc"]) for r in rows})
    colors = {s: f"C{i}" for i, s in enumerate(series)}  # one colour per series everywhere
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, (key, ylabel) in zip(axes, keys, strict=True):
        for ax, mode in zip(row, ("lora", "full"), strict=True):
            for engine, gc in series:
                pts = sorted((r["T"], r[key] / 1024) for r in rows if r["engine"] == engine
                             and r["gc"] == gc and r["mode"] == mode and "error" not in r
                             and r.get(key))  # fmt: skip
                if pts:
                    name = f"{engine} (ckpt)" if gc else engine
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name,
                            color=colors[engine, gc])  # fmt: skip
            ax.set_title(f"{mode}, V = 151,936, G = 8")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        row[0].set_ylabel(ylabel)
    for ax in axes[1]:
        ax.set_xlabel("completion tokens T")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "MODE", "T"))
    ap.add_argument("--model-dir")
    ap.add_argument("--size", default="small")
    ap.add_argument("--vocab", type=int, default=V_QWEN)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 1024, 2048])
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--engines", nargs="+",
                    default=["grpo", "grpo-1row", "grpo-unchunked", "mlx-lm-lora"])  # fmt: skip
    ap.add_argument("--unchunked-max-tokens", type=int, default=512)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing (grpo engines)")
    ap.add_argument("--both-gc", action="store_true", help="grpo engines with and without it")
    ap.add_argument("--rollout", action="store_true")
    ap.add_argument("--lora-python", default=os.environ.get("GRPO_LORA_PYTHON", sys.executable))
    ap.add_argument("--trl-python", help="a Python with torch + TRL, for the 'trl' engine")
    ap.add_argument("--one-step", action="store_true",
                    help="measure the first step only (cheaper; its peak bounds the steady one)")  # fmt: skip
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no runs: print the table (and --plot) of earlier --json files")  # fmt: skip
    args = ap.parse_args(argv)
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        rows = [r for r in rows if r["engine"] != "grpo-rollout"]
        rows.sort(key=lambda r: (r["T"], r["mode"] != "lora", r["engine"], r["gc"]))
        print(markdown(rows))
        if args.plot:
            plot(rows, args.plot)
        return
    if args.one_step:
        os.environ["GRPO_BENCH_ONE_STEP"] = "1"  # the children read it
    if args.child:
        return child(args)

    import grpo  # noqa: F401
    from grpo.io.tiny import build_tiny_model

    model_dir = args.model_dir or str(
        build_tiny_model(
            Path(tempfile.mkdtemp()) / "m",
            size=args.size,
            vocab_size=args.vocab,
            # Room for the longest completions after the 32-token prompt.
            max_position_embeddings=max(4096, 2 * max(args.tokens)),
        )
    )
    rows = []
    for T in args.tokens:
        for mode in args.modes:
            # Engines interleaved within each (T, mode): the load moves all of them alike.
            for engine in args.engines:
                if engine == "grpo-unchunked" and T > args.unchunked_max_tokens:
                    continue
                if engine == "trl" and not args.trl_python:
                    raise SystemExit("engine 'trl' needs --trl-python (a Python with torch + trl)")
                python = {"mlx-lm-lora": args.lora_python, "trl": args.trl_python}.get(
                    engine, sys.executable
                )
                gcs = [False, True] if args.both_gc and engine != "mlx-lm-lora" else [args.gc]
                for gc in gcs:
                    r = run_child(python, model_dir, engine, mode, T, gc)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
        if args.rollout:
            r = run_child(sys.executable, model_dir, "grpo-rollout", "-", T, False)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print(markdown([r for r in rows if r["engine"] != "grpo-rollout"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot([r for r in rows if r["engine"] != "grpo-rollout"], args.plot)


if __name__ == "__main__":
    main()
