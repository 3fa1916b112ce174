"""Peak memory of one TRL GRPO update on bench/memory.py's rows; prints one ``RESULT`` JSON line.

Runs in a separate environment with torch and TRL (not grpo's .venv), driven by
``bench/memory.py --trl-python``:

    .venv-trl/bin/python bench/peers/trl_memory.py MODEL_DIR --tokens 2048 [--lora] [--gc]

The same synthetic rows as the grpo and mlx-lm-lora cells (``workload.memory_rows``: one
prompt of 32 ids, G = 8 completions of exactly ``T`` ids, fixed advantages), through
TRL's own functions with TRL's defaults otherwise (8 rows per micro-batch, its fused
chunked LM head, loss ``dapo``): the reference log-probs as ``_generate_and_score_completions``
computes them (the adapter disabled for LoRA, the reference model for a full fine-tune),
then ``compute_loss``, ``backward`` and one AdamW step. No generation, so no sampling
memory. PyTorch's CPU allocator has no peak counter, so the figure is the process's peak
RSS (``ru_maxrss``), with the RSS after loading the model beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# This script's own directory is on sys.path when it runs as a script.
from trl_grpo import lora_config  # noqa: E402
from workload import PROMPT_CHARS, G, digit_fraction, memory_rows, prompt_texts  # noqa: E402


def _rss_mib() -> float:
    # Linux reports ru_maxrss in KiB: the process's peak resident set so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.grpo_trainer import use_adapter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T = args.tokens
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rss_load = _rss_mib()
    peft_config = lora_config() if args.lora else None
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, num_generations=G, max_completion_length=T,
            per_device_train_batch_size=G, gradient_accumulation_steps=1, beta=0.04,
            learning_rate=1e-5, report_to="none", use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=args.gc, save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model, reward_funcs=lambda completions, **_: digit_fraction(completions),
            args=cfg, train_dataset=Dataset.from_list([{"prompt": p} for p in prompt_texts(G)]),
            processing_class=tok, peft_config=peft_config,
        )  # fmt: skip
        policy = trainer.model
        if args.gc:
            # What transformers' Trainer.train does before its first step.
            policy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs
            )
        prompt, completions, advantages = memory_rows(T)
        prompt_ids = torch.tensor([prompt] * G)
        completion_ids = torch.tensor(completions)
        inputs = {
            "prompt_ids": prompt_ids,
            "prompt_mask": torch.ones_like(prompt_ids),
            "completion_ids": completion_ids,
            "completion_mask": torch.ones_like(completion_ids),
            "advantages": torch.tensor(advantages),
            "num_items_in_batch": torch.tensor(float(G * T)),
        }
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        with torch.no_grad():
            if trainer.ref_model is not None:
                ref, _, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.ref_model, ids, mask, T
                )
            else:
                with use_adapter(policy, adapter_name=None):
                    ref, _, _ = trainer._get_per_token_logps_and_entropies(policy, ids, mask, T)
        inputs["ref_per_token_logps"] = ref
        rss_ref = _rss_mib()
        policy.train()
        optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = cfg.gradient_accumulation_steps
        # Two steps, as the MLX cells (the second holds the optimizer state from the first);
        # the bench's --one-step sets GRPO_BENCH_ONE_STEP=1 for one.
        for _ in range(1 if os.environ.get("GRPO_BENCH_ONE_STEP") == "1" else 2):
            t0 = time.perf_counter()
            loss = trainer.compute_loss(policy, inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        step_s = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "engine": "trl", "mode": "lora" if args.lora else "full", "T": T, "gc": args.gc,
        "rss_mib": _rss_mib(), "rss_after_load_mib": rss_load, "rss_after_ref_mib": rss_ref,
        "loss": loss.item(), "step_s": step_s, "prompt_tokens": PROMPT_CHARS,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
