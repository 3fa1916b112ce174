"""Side-by-side GRPO step time: grpo vs mlx-lm-lora vs TRL, same seeded model, same run.

    .venv/bin/python bench/peers/run.py --sizes tiny small --modes full lora \
        --trl-python .venv-trl/bin/python --steps 5 --warmup 2 \
        [--json out.json] [--markdown docs/benchmarks.md]

For each model size one seeded directory is built (``build_tiny_model(seed=0)``: a Llama
config plus ``model.safetensors`` whose tensor names are Hugging Face's, so the same
directory loads in ``mlx_lm.load`` and in ``transformers.AutoModelForCausalLM``). Each
engine runs in its own fresh process with 2 BLAS/OpenMP threads, G = 8, 64 completion
tokens (fixed length), one prompt per step, beta = 0.04:

* ``grpo``        - bench/step.py (GRPOTrainer), in this interpreter's environment;
* ``mlx-lm-lora`` - bench/peers/mlx_lm_lora_grpo.py, same environment, OpenBLAS loaded
  before mlx (``--lora-bundled-blas`` adds a run on mlx's bundled BLAS);
* ``trl``         - bench/peers/trl_grpo.py under ``--trl-python`` (a separate venv with
  torch 2.13 CPU + TRL 1.16 + peft; see bench/README.md).

A peer that cannot run is skipped with the reason. Ratios are grpo step time / peer step
time (lower is better; target <= 0.5). The 1-min load average is recorded around every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _run(cmd: list[str], *, threads: int, timeout: float) -> tuple[dict | None, str]:
    load = os.getloadavg()[0]
    tic = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_env(threads), timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, f"exit {proc.returncode}: {' | '.join(tail)}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1])
    out["load_before"], out["load_after"] = load, os.getloadavg()[0]
    out["wall_s"] = time.perf_counter() - tic
    return out, ""


def run_grpo(model_size, mode, args, tmp) -> tuple[dict | None, str]:
    out = Path(tmp) / f"grpo-{model_size}-{mode}.json"
    cmd = [sys.executable, str(BENCH / "step.py"), "--sizes", model_size, "--batches", "1",
           "--tokens", str(args.tokens), "--modes", mode, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--json", str(out)]  # fmt: skip
    res, why = _run(cmd, threads=args.threads, timeout=args.timeout)
    if res is None:
        return None, why
    cell = json.loads(out.read_text())["results"][0]
    return {"peer": "grpo", "step_s": cell["median_s"]["total"], "cpu_s": cell["median_s"]["cpu"],
            "breakdown": cell["median_s"],
            "peak_mb": cell["peak_mb"], "load_before": res["load_before"],
            "load_after": res["load_after"]}, ""  # fmt: skip


def run_lora(model_dir, mode, args, *, bundled=False):
    try:
        import importlib.util

        if importlib.util.find_spec("mlx_lm_lora") is None:
            return None, "mlx-lm-lora is not installed (pip install 'mlx-grpo[bench]')"
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    cmd = [sys.executable, str(HERE / "mlx_lm_lora_grpo.py"), str(model_dir), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--tokens", str(args.tokens)]  # fmt: skip
    cmd += ["--lora"] if mode == "lora" else []
    cmd += ["--bundled-blas"] if bundled else []
    return _run(cmd, threads=args.threads, timeout=args.timeout)


def run_trl(model_dir, mode, args, *, threads=None):
    if not args.trl_python or not Path(args.trl_python).exists():
        return None, f"no TRL environment (--trl-python={args.trl_python!r}); see bench/README.md"
    cmd = [args.trl_python, str(HERE / "trl_grpo.py"), str(model_dir), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--tokens", str(args.tokens),
           "--threads", str(threads or args.threads)]  # fmt: skip
    cmd += ["--lora"] if mode == "lora" else []
    return _run(cmd, threads=threads or args.threads, timeout=args.timeout)


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "### Peers (bench/peers/run.py)",
        "",
        f"{env['date']}; {env['cpus']} cores; G = 8, {env['tokens']} completion tokens "
        f"(fixed length), one prompt per step, beta = 0.04, {env['threads']} thread(s) per process "
        "unless the engine name says otherwise, each engine "
        "in a fresh process on the same seeded model directory. Seconds per optimizer step "
        "are medians over the measured steps; ratio = grpo / peer (target <= 0.5). `load` is "
        "the 1-min load average before -> after the run (other helpers shared the 2 cores).",
        "",
        "| model | mode | engine | s/step | CPU-s/step | grpo ratio (wall) | grpo ratio (CPU-s) "
        "| load | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("step_s") is None:
            lines.append(
                f"| {r['size']} | {r['mode']} | {r['engine']} | skipped | | | | | {r['why']} |"
            )
            continue
        ratio = "" if r["engine"] == "grpo" else f"{r['ratio']:.2f}x"
        cratio = f"{r['cpu_ratio']:.2f}x" if r.get("cpu_ratio") else ""
        cpu = f"{r['cpu_s']:.3f}" if r.get("cpu_s") else ""
        lines.append(
            f"| {r['size']} | {r['mode']} | {r['engine']} | {r['step_s']:.3f} | {cpu} | {ratio} | {cratio} "
            f"| {r['load_before']:.1f}->{r['load_after']:.1f} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--engines", nargs="+", default=["grpo", "mlx-lm-lora", "trl"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument(
        "--trl-python", default=os.environ.get("GRPO_TRL_PYTHON", ".venv-trl/bin/python")
    )
    ap.add_argument(
        "--trl-extra-threads",
        nargs="*",
        type=int,
        default=[],
        help="also run TRL with these thread counts (torch's OpenMP barriers stall when "
        "other jobs hold the cores)",
    )
    ap.add_argument(
        "--lora-bundled-blas",
        action="store_true",
        help="also run mlx-lm-lora on mlx's bundled BLAS",
    )
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(BENCH.parent))
    from grpo.io.tiny import build_tiny_model

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
           "tokens": args.tokens, "threads": args.threads, "args": vars(args)}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model_dir = build_tiny_model(Path(tmp) / size, size=size, seed=0)
            for mode in args.modes:
                results = {}
                plan = [(e, None) for e in args.engines]
                if args.lora_bundled_blas and "mlx-lm-lora" in args.engines:
                    plan.append(("mlx-lm-lora", "bundled"))
                if "trl" in args.engines:
                    plan += [("trl", n) for n in args.trl_extra_threads]
                for engine, variant in plan:
                    if engine == "grpo":
                        res, why = run_grpo(size, mode, args, tmp)
                    elif engine == "mlx-lm-lora":
                        res, why = run_lora(model_dir, mode, args, bundled=variant == "bundled")
                    else:
                        res, why = run_trl(model_dir, mode, args, threads=variant)
                    if variant == "bundled":
                        name = f"{engine} (bundled BLAS)"
                    elif variant is not None:
                        name = f"{engine} ({variant} thread{'s' if variant > 1 else ''})"
                    else:
                        name = engine
                    row = {"size": size, "mode": mode, "engine": name, "why": why,
                           **(res or {}), "step_s": (res or {}).get("step_s")}  # fmt: skip
                    results[name] = row
                    rows.append(row)
                    msg = f"{row['step_s']:.3f} s/step" if res else f"skipped: {why}"
                    print(f"{size} {mode} {name}: {msg}", flush=True)
                ours = results.get("grpo", {}).get("step_s")
                for row in results.values():
                    if ours and row["step_s"] and row["engine"] != "grpo":
                        row["ratio"] = ours / row["step_s"]
                        ours_cpu, cpu = results["grpo"].get("cpu_s"), row.get("cpu_s")
                        row["cpu_ratio"] = ours_cpu / cpu if ours_cpu and cpu else None
                        print(
                            f"  grpo / {row['engine']} = {row['ratio']:.2f}x wall, "
                            f"{row['cpu_ratio'] or float('nan'):.2f}x CPU-s"
                        )
    table = markdown(rows, env)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
