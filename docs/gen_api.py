"""Regenerate docs/api.md from the docstrings: ``python docs/gen_api.py``."""

import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

import attrs

import grpo
from grpo.config import GRPOConfig, field_help

FIELD_DOCS = field_help()  # each field's help, from its attrs metadata

MODULES = [
    ("grpo.core.advantages", "Group-relative advantages"),
    ("grpo.core.logprobs", "Log-probabilities"),
    ("grpo.core.loss", "Policy losses"),
    ("grpo.core.surrogates", "Loss pieces"),
    ("grpo.core.forward", "Model forward of the loss"),
    ("grpo.core.shared_prefix", "Shared-prefix training forward"),
    ("grpo.core.attention", "CPU attention kernels"),
    ("grpo.core.kv_cache", "KV caches"),
    ("grpo.core.pipeline", "From a rollout to micro-batches"),
    ("grpo.core.batch", "Loss batches"),
    ("grpo.core.sampling", "Sampling"),
    ("grpo.core.rollout", "Rollout"),
    ("grpo.core.importance", "Sampler mismatch correction (TRL vLLM IS)"),
    ("grpo.core.quantize", "Quantized rollout copy (rollout_quantization)"),
    ("grpo.core.continuous", "Continuous batching"),
    ("grpo.core.multiturn", "Multi-turn rollout"),
    ("grpo.core.score", "Scoring"),
    ("grpo.core.state", "Training state"),
    ("grpo.core.step", "Optimizer step"),
    ("grpo.core.memory", "Memory budget (max_memory_gb)"),
    ("grpo.core.optim", "Optimizers and schedules (torch / transformers semantics)"),
    ("grpo.core.numerics", "Numerics"),
    ("grpo.core.fastmath", "Fast CPU math"),
    ("grpo.core.distributed", "Data parallelism (pure)"),
    ("grpo.rewards", "Built-in rewards"),
    ("grpo.tasks", "Built-in tasks"),
    ("grpo.config", "Configuration"),
    ("grpo.errors", "Errors"),
    ("grpo.trainer", "Trainer"),
    ("grpo.tools", "Tools"),
    ("grpo.environments", "Environments"),
    ("grpo.agent", "The tool loop"),
    ("grpo.agentic", "Tools, environments and rollout_func in the trainer"),
    ("grpo.io.data", "Data"),
    ("grpo.io.model", "Models"),
    ("grpo.io.fast_attention", "CPU attention and SwiGLU kernels"),
    ("grpo.io.checkpoint", "Checkpoints"),
    ("grpo.io.logging", "Logging"),
    ("grpo.io.plot", "Plots"),
    ("grpo.io.dist", "Data parallelism (processes)"),
    ("grpo.io.tiny", "Tiny models"),
    ("grpo.warmstart", "Warm start"),
    ("grpo.io.signals", "Interrupts"),
    ("grpo.default_job", "The default job"),
]
_listed = {m for m, _ in MODULES}
MODULES += [(m, m) for m in sorted(set(grpo._WHERE.values())) if m not in _listed]


def first_line(obj):
    doc = inspect.getdoc(obj) or ""
    para = doc.split("\n\n")[0].replace("\n", " ").strip()
    return para


def sig(obj):
    try:
        s = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    s = re.sub(r"(: |-> )'([^']*)'", r"\1\2", s)
    s = re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"\1", s)  # defaults by name, not address
    return s.replace("<", "&lt;")


out = []
w = out.append
w("# API reference\n")
w(
    "Every public function, class and `GRPOConfig` field, grouped by module. `import grpo` "
    "re-exports the most used names (`grpo.rollout`, `grpo.GRPOTrainer`, ...; see "
    "`grpo.__all__`). Shapes: `B` prompts, `G` completions per prompt, `N = B*G` rows "
    "(group-contiguous), `T` completion tokens, `P` prompt tokens, `V` vocab, `F` reward "
    "functions. Full docstrings: `help(grpo.<name>)`.\n"
)
w(
    "Generated from the docstrings; `tests/test_cli.py` checks that every name in "
    "`grpo.__all__` and every `GRPOConfig` field appears here.\n"
)
w("## Contents\n")
w(
    "- [Top level](#top-level)\n- [Command line](#command-line)\n- [GRPOConfig fields](#grpoconfig-fields)"
)
for mod, title in MODULES:
    anchor = title.lower().replace(" ", "-").replace("(", "").replace(")", "")
    w(f"- [{title}](#{anchor}) (`{mod}`)")
w("")
w("## Top level\n")
w("- `grpo.__version__`: the package version.")
w(
    f"- `blas_info(){sig(grpo.blas_info)[2:]}` (`grpo.blas_info`): {first_line(grpo.blas_info)} Set `GRPO_FAST_BLAS=0` to keep mlx's bundled BLAS."
)
w("")
w("## Command line\n")
w("| command | what it does |\n|---|---|")
w(
    "| `grpo train` | the default job: a cached warm-started tiny model learns the `reverse` task; writes `grpo_output/metrics.jsonl`, `reward_curve.png`, weights |"
)
w(
    "| `grpo train --model M --dataset D --reward R` | GRPO on any mlx-lm model (directory or hub id), dataset (jsonl/json/csv/parquet, folder, hub id, or built-in task name) and reward (built-in name, `module:function`, `file.py:function`, comma-separated) |"
)
w(
    "| `--config run.yaml` | any `GRPOConfig` field, plus `model`, `dataset`, `reward`; command-line flags override it |"
)
w(
    "| `--<field> VALUE` | any `GRPOConfig` field (`--learning_rate 1e-5`, `--use_lora false`, `--reward_weights 1,0.5`, `--epsilon_high none`) |"
)
w("| `--warm_start_steps N` | supervised warm-start steps of the default tiny model (0 skips it) |")
w(
    "| `--resume_from_checkpoint [DIR]` | resume from DIR or the newest checkpoint in `--output_dir` |"
)
w(
    "| `--overwrite_output_dir` | delete another run's checkpoints, metrics and weights in `--output_dir` before the first save (without it such a directory is refused) |"
)
w("| `--debug` | print the full traceback of an error as well as its one-line message |")
w(
    "| `grpo eval [--model M] [--adapter_path DIR] [--dataset D] [--reward R] [--limit N]` | mean reward per function of a model (plus adapters) on a dataset; no flags: the default model on 64 held-out `reverse` prompts |"
)
w(
    "| `grpo --help`, `grpo train --help`, `grpo eval --help` | every option with its type and default |"
)
w(
    "\nEvery error prints one line and a hint (docs/reliability.md lists them): exit 2 for bad input found before training (unknown flag or YAML key, bad value, missing file, invalid combination, an output directory in use or holding another run, a checkpoint that does not fit), 1 for a failure during training, 130 / 143 for SIGINT / SIGTERM. The cache of the default model: `$MLX_GRPO_CACHE`, else `$XDG_CACHE_HOME/mlx-grpo`, else `~/.cache/mlx-grpo`.\n"
)
w("## GRPOConfig fields\n")
w(
    first_line(GRPOConfig) + " Batch sizes count completions (rows), as in TRL. "
    "Invalid values and combinations raise `ValueError` naming the fields.\n"
)
w("| field | type | default | meaning |\n|---|---|---|---|")
hints = typing.get_type_hints(GRPOConfig)
missing = []
for f in attrs.fields(GRPOConfig):
    t = hints[f.name]
    tn = getattr(t, "__name__", str(t)).replace("|", "\\|")
    d = f.default
    doc = FIELD_DOCS.get(f.name)
    if doc is None:
        missing.append(f.name)
        doc = ""
    w(f"| `{f.name}` | `{tn}` | `{d!r}` | {doc} |")
props = [n for n, v in vars(GRPOConfig).items() if isinstance(v, property)]
meths = [
    n
    for n, v in vars(GRPOConfig).items()
    if not n.startswith("_") and callable(v) or isinstance(v, classmethod)
]
w(
    "\nDerived properties: "
    + ", ".join(f"`{p}`" for p in props)
    + ". Methods: "
    + ", ".join(f"`{m}`" for m in meths if not m.startswith("_"))
    + ".\n"
)
if missing:
    print("MISSING FIELD DOCS", missing, file=sys.stderr)

for mod, title in MODULES:
    m = importlib.import_module(mod)
    w(f"## {title}\n")
    w(f"`{mod}`: {first_line(m)}\n")
    names = getattr(m, "__all__", None) or [n for n in vars(m) if not n.startswith("_")]
    for n in names:
        obj = getattr(m, n)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            if grpo._WHERE.get(n) == mod:
                r = repr(obj)
                r = r if len(r) < 90 and " at 0x" not in r else type(obj).__name__ + " instance"
                doc = first_line(type(obj)) if not isinstance(obj, (tuple, dict, str)) else ""
                if isinstance(obj, dict):
                    r = "{" + ", ".join(map(repr, obj)) + "}"
                w(f"- `{n}` = `{r}`" + (f": {doc}" if doc and "instance" in r else ""))
            continue
        if getattr(obj, "__module__", None) != mod:
            continue
        if inspect.isclass(obj):
            fields = getattr(obj, "_fields", None)
            if fields:
                w(f"- **class `{n}`**`({', '.join(fields)})`: {first_line(obj)}")
            elif attrs.has(obj):
                w(
                    f"- **class `{n}`**`({', '.join(a.name for a in attrs.fields(obj))})`: {first_line(obj)}"
                )
            else:
                w(f"- **class `{n}`**`{sig(obj)}`: {first_line(obj)}")
            if n in ("GRPOTrainer", "PromptSampler", "Progress", "MetricsWriter", "PromptEncoder"):
                for mn, mv in vars(obj).items():
                    if mn.startswith("_") or not callable(mv) and not isinstance(mv, property):
                        continue
                    if isinstance(mv, property):
                        w(f"  - `.{mn}` (property): {first_line(mv)}")
                    else:
                        w(f"  - `.{mn}{sig(mv)}`: {first_line(mv)}")
        else:
            w(f"- `{n}{sig(obj)}`: {first_line(obj)}")
    w("")
Path(__file__).with_name("api.md").write_text("\n".join(out) + "\n")
