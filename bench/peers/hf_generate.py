"""transformers' ``generate`` on PyTorch CPU as a benchmark worker for bench/rollout.py.

Runs in a separate environment with torch and transformers (bench/README.md); started by
``bench/rollout.py --hf-python .venv-trl/bin/python``, never imported by grpo.

    .venv-trl/bin/python bench/peers/hf_generate.py MODEL_DIR [--threads 2]

Loads the seeded directory once (``AutoModelForCausalLM``, float32, eval mode), then
answers one JSON request per stdin line with one JSON line on stdout, so the parent can
interleave it with its own engines:

* ``{"op": "generate", "prompts": [[ids]], "seed": s, "G": 8, "tokens": 64}``: ``G``
  sampled completions per prompt (``num_return_sequences``), exactly ``tokens`` new tokens
  (``min_new_tokens`` masks EOS until the limit), temperature 1, no top-k/top-p filter,
  DynamicCache. Reply ``{"n", "wall", "cpu"}``: completion tokens, seconds of wall and of
  process CPU time around the ``generate`` call.
* ``{"op": "breakdown", ...same...}``: where one ``generate`` goes. ``prefill`` = a
  ``max_new_tokens=1`` generate (prompt forward and the first draw); ``decode`` = (full
  generate - prefill) / (tokens - 1); ``forward`` = one decode-step model call on the
  ``B * G`` rows with the prompt's cache (median of ``tokens`` calls); ``sampling`` =
  softmax + ``multinomial`` on those rows' logits; ``other`` = decode - forward - sampling
  (generate's logits processors, stopping criteria, cache bookkeeping, Python).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": args.threads}))
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        op = {"generate": generate, "breakdown": breakdown}[req["op"]]
        with torch.inference_mode():
            reply = op(torch, model, req)
        print(json.dumps(reply))
        sys.stdout.flush()


def generate(torch, model, req, tokens=None):
    tokens = tokens or req["tokens"]
    ids = torch.tensor(req["prompts"], dtype=torch.long)
    torch.manual_seed(req["seed"])
    tic, cpu = time.perf_counter(), time.process_time()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
        top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
        num_return_sequences=req["G"],
    )  # fmt: skip
    wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
    n = (out.shape[1] - ids.shape[1]) * out.shape[0]
    assert n == len(req["prompts"]) * req["G"] * tokens, (n, out.shape)
    return {"n": int(n), "wall": wall, "cpu": cpu}


def breakdown(torch, model, req):
    T = req["tokens"]
    full = generate(torch, model, req)["wall"]
    prefill = generate(torch, model, req, tokens=1)["wall"]
    ids = torch.tensor(req["prompts"], dtype=torch.long).repeat_interleave(req["G"], dim=0)
    out = model(ids, use_cache=True)
    cache, logits = out.cache, out.logits[:, -1, :]
    forward = []
    for _ in range(T):
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        tic = time.perf_counter()
        logits = model(nxt, cache=cache, use_cache=True).logits[:, -1, :]
        forward.append(time.perf_counter() - tic)
    sampling = []
    for _ in range(T):
        tic = time.perf_counter()
        torch.multinomial(torch.softmax(logits.float(), -1), 1)
        sampling.append(time.perf_counter() - tic)
    decode = (full - prefill) / (T - 1)
    fwd, smp = statistics.median(forward), statistics.median(sampling)
    return {"total": full, "prefill": prefill, "decode": decode, "forward": fwd,
            "sampling": smp, "other": decode - fwd - smp}  # fmt: skip


if __name__ == "__main__":
    main()
