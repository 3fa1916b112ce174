"""mlx-lm-lora's GRPO trainer (``train_grpo``) on a seeded model directory; prints one JSON line.

    .venv/bin/python bench/peers/mlx_lm_lora_grpo.py MODEL_DIR --steps 5 --warmup 2 [--lora]

OpenBLAS is loaded with ``RTLD_GLOBAL`` before ``mlx.core`` (``import grpo`` does exactly
that and nothing else of grpo is used), so mlx-lm-lora runs on the same fast BLAS as grpo;
``--bundled-blas`` (``GRPO_FAST_BLAS=0``) keeps mlx's bundled reference BLAS instead.

Settings match bench/peers/run.py: G = 8, one prompt per step (``batch_size=1``),
fixed-length completions (the tokenizer's EOS ids are hidden from the generator and no
end-answer token is set), temperature 1, no top-k/top-p/min-p, beta = 0.04, a separately
loaded reference model, Adam at 1e-5. The step time is the time between consecutive
``on_train_loss_report`` callbacks with ``steps_per_report = 1`` (generation, rewards,
reference forward, loss, backward and update; mlx-lm-lora evaluates its state each step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workload import G, digit_fraction, prompt_texts  # noqa: E402  (bench/workload.py, stdlib only)


def digit_reward(prompts, completions, answer, types=None):
    return digit_fraction(completions)


class NoEosTokenizer:
    """Hide EOS ids so every completion runs to ``max_completion_length``."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_ids = set()

    def encode(self, *a, **k):
        return self._tok.encode(*a, **k)

    def decode(self, *a, **k):
        return self._tok.decode(*a, **k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--bundled-blas", action="store_true")
    args = ap.parse_args()

    if args.bundled_blas:
        os.environ["GRPO_FAST_BLAS"] = "0"
    # isort: off
    import grpo  # noqa: F401  (only to load OpenBLAS before mlx, as grpo itself does)
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora import __version__ as lora_version
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    # isort: on

    mx.random.seed(0)
    model, tok = mlx_lm.load(args.model_dir)
    ref_model, _ = mlx_lm.load(args.model_dir)
    ref_model.freeze()
    if args.lora:
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0})
    data = [(tok.encode(p), tok.encode("0"), p, "0") for p in prompt_texts(64)]

    class Timer(TrainingCallback):
        def __init__(self):
            self.stamps, self.cpu = [], []
            self.peak = 0.0

        def on_train_loss_report(self, info):
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.peak = max(self.peak, info.get("peak_memory", 0.0))

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        targs = GRPOTrainingArgs(
            batch_size=1,
            iters=args.warmup + args.steps,
            val_batches=0,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=512,
            adapter_file=os.path.join(out, "adapters.safetensors"),
            group_size=G,
            beta=0.04,
            max_completion_length=args.tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            grpo_loss_type="bnpo",
        )
        stdout = sys.stdout
        sys.stdout = sys.stderr  # its per-step report goes to stderr; stdout stays JSON
        tic, cpu_tic = time.perf_counter(), time.process_time()
        try:
            train_grpo(
                model=model, ref_model=ref_model, tokenizer=NoEosTokenizer(tok),
                optimizer=optim.Adam(learning_rate=1e-5), train_dataset=data, val_dataset=None,
                reward_funcs=[digit_reward], args=targs, training_callback=timer,
                end_answer_token="",
            )  # fmt: skip
        finally:
            sys.stdout = stdout
    stamps = [tic, *timer.stamps]
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    measured = times[args.warmup :]
    cpu = [cpu_tic, *timer.cpu]
    cpu_times = [b - a for a, b in zip(cpu, cpu[1:], strict=False)][args.warmup :]
    print(json.dumps({
        "peer": "mlx-lm-lora", "mode": "lora" if args.lora else "full", "tokens": args.tokens,
        "batch": 1, "step_s": statistics.median(measured), "steps": len(measured),
        "cpu_s": statistics.median(cpu_times),
        "all_step_s": [round(t, 4) for t in times], "peak_gb": timer.peak,
        "blas": grpo.blas_info()["backend"],
        "versions": {"mlx-lm-lora": lora_version, "mlx": mx.__version__,
                     "mlx-lm": mlx_lm.__version__, "python": sys.version.split()[0]},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
