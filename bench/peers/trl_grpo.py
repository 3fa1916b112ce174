"""TRL's GRPOTrainer on PyTorch CPU, on a seeded model directory; prints one JSON line.

Runs in a separate environment with torch and TRL (not grpo's .venv): see bench/README.md.

    .venv-trl/bin/python bench/peers/trl_grpo.py MODEL_DIR --steps 5 --warmup 2 [--lora]

Settings match bench/peers/run.py: G = 8, one prompt per optimizer step, fixed-length
completions (``min_new_tokens = max_completion_length`` masks EOS until the limit),
beta = 0.04, float32, ``torch.set_num_threads(threads)``. The step time is the wall time
between transformers' ``on_step_begin`` / ``on_step_end`` callbacks (generation, scoring,
reference forward, loss, backward and update are all inside it).
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


def _rss_mib() -> float:
    import resource

    # Linux reports ru_maxrss in KiB: the process's peak resident set so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lora_config():
    """The peers' LoRA: rank 8 on every linear layer of the Llama blocks (as grpo's)."""
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip


def digit_reward(completions, **_):
    return digit_fraction(completions)


def prompts(n, seed=0):
    return [{"prompt": text} for text in prompt_texts(n, seed=seed)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="prompts per step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    rss_after_load = _rss_mib()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    peft_config = lora_config() if args.lora else None

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times = [], []

        def on_step_begin(self, a, state, control, **kw):
            self.tic, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.tic)
            self.cpu_times.append(time.process_time() - self.cpu)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out,
            num_generations=G,
            max_completion_length=args.tokens,
            per_device_train_batch_size=G * args.batch,
            gradient_accumulation_steps=1,
            generation_kwargs={"min_new_tokens": args.tokens},
            temperature=1.0,
            top_p=1.0,
            beta=0.04,
            learning_rate=1e-5,
            max_steps=args.warmup + args.steps,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=digit_reward, args=cfg,
            train_dataset=Dataset.from_list(prompts(64 * args.batch)),
            processing_class=tok, callbacks=[timer], peft_config=peft_config,
        )  # fmt: skip
        trainer.train()
    measured = timer.times[args.warmup :]
    print(json.dumps({
        "peer": "trl", "mode": "lora" if args.lora else "full", "tokens": args.tokens,
        "batch": args.batch, "step_s": statistics.median(measured), "steps": len(measured),
        "cpu_s": statistics.median(timer.cpu_times[args.warmup :]),
        "all_step_s": [round(t, 4) for t in timer.times], "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "rss_after_load_mib": rss_after_load, "rss_mib": _rss_mib(),
        "versions": {"torch": torch.__version__, "trl": trl.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
    }))  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
