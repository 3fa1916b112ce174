"""TRL GRPO scripts run with only `trl` replaced by `grpo` (and hub ids by local files).

Also TRL's trainer semantics the scripts rely on: ``peft_config`` decides LoRA vs a full
fine-tune, ``trainer.state`` is transformers' ``TrainerState``, transformers-style callbacks
are called and can stop training, and ``optimizers=`` takes an mlx optimizer.
"""

import dataclasses
import json
import sys
import types

import mlx.optimizers as optim
import pytest
from helpers import PROMPTS

import grpo  # noqa: F401
from grpo.config import GRPOConfig
from grpo.errors import ConfigError
from grpo.trainer import GRPOTrainer

QUICKSTART = """
from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer

dataset = load_dataset("trl-lib/tldr", split="train")

# Define the reward function, which rewards completions that are close to 20 characters
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]

training_args = GRPOConfig(output_dir="Qwen2-0.5B-GRPO")
trainer = GRPOTrainer(
    model="Qwen/Qwen2-0.5B-Instruct",
    reward_funcs=reward_len,
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
"""

CONVERSATIONAL = """
from datasets import load_dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

dataset = load_dataset("trl-lib/ultrafeedback-prompt", split="train")
eval_dataset = load_dataset("trl-lib/ultrafeedback-prompt", split="test")

def reward_len(completions, **kwargs):
    return [-abs(20 - len(c[0]["content"])) / 20 for c in completions]

def reward_vowels(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c[0]["content"]) / 10 for c in completions]

training_args = GRPOConfig(
    output_dir="Qwen2-0.5B-GRPO-lora",
    learning_rate=1e-5,
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=16,
    max_steps=4,
    logging_steps=1,
    eval_strategy="steps",
    eval_steps=2,
    report_to="none",
    bf16=True,
    gradient_checkpointing=True,
    use_vllm=False,
    reward_weights=[1.0, 0.5],
)
trainer = GRPOTrainer(
    model="Qwen/Qwen2-0.5B-Instruct",
    reward_funcs=[reward_len, reward_vowels],
    args=training_args,
    train_dataset=dataset,
    eval_dataset=eval_dataset,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
)
trainer.train()
"""


@dataclasses.dataclass
class LoraConfig:
    """PEFT's ``LoraConfig`` fields and defaults (peft needs PyTorch, absent here)."""

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: object = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: object = None
    layers_to_transform: object = None
    task_type: object = None


def _port(script: str, model_dir, data: dict, out) -> str:
    """The TRL script with only the import and the hub ids replaced."""
    text = script.replace("from trl import", "from grpo import")
    text = text.replace('"Qwen/Qwen2-0.5B-Instruct"', repr(str(model_dir)))
    for split, path in data.items():
        for hub in ("trl-lib/tldr", "trl-lib/ultrafeedback-prompt"):
            text = text.replace(
                f'load_dataset("{hub}", split="{split}")',
                f'load_dataset("json", data_files={str(path)!r}, split="train")',
            )
    return text.replace('output_dir="', f'output_dir="{out}/')


def _run(text: str, monkeypatch, tmp_path) -> dict:
    if "peft" not in sys.modules:
        monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(LoraConfig=LoraConfig))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(text, "trl_script.py", "exec"), scope)
    return scope


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_quickstart_runs_with_the_import_changed(tiny_model_dir, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "tldr.jsonl", [{"prompt": "ab"}, {"prompt": "cde"}])
    scope = _run(
        _port(QUICKSTART, tiny_model_dir, {"train": data}, tmp_path), monkeypatch, tmp_path
    )
    trainer = scope["trainer"]
    assert trainer.policy.kind == "full"  # no peft_config: every weight trains, as in TRL
    # TRL's defaults: 8 generations of 8 completions per device batch, 3 epochs of 2 prompts.
    assert trainer.state.global_step == trainer.state.max_steps == 6
    history = trainer.state.log_history
    assert [r["step"] for r in history if "loss" in r] == [6]  # logging_steps=10: the last
    assert {"reward", "rewards/reward_len/mean", "entropy"} <= set(history[-1])  # beta=0: no kl


def test_trl_conversational_lora_eval_script(tiny_model_dir, tmp_path, monkeypatch):
    conv = [{"prompt": [{"role": "user", "content": t}]} for t in ("hi", "tell", "ok", "why")]
    data = {
        "train": _jsonl(tmp_path / "train.jsonl", conv),
        "test": _jsonl(tmp_path / "test.jsonl", conv[:2]),
    }
    scope = _run(_port(CONVERSATIONAL, tiny_model_dir, data, tmp_path), monkeypatch, tmp_path)
    trainer = scope["trainer"]
    assert trainer.policy.kind == "lora"
    assert (trainer.args.lora_rank, trainer.args.lora_alpha) == (8, 16.0)
    history = trainer.state.log_history
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"rewards/reward_len/mean", "rewards/reward_vowels/mean"} <= set(train[-1])
    assert "eval_rewards/reward_vowels/mean" in evals[-1]


def _lowercase(completions, **kwargs):
    return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in completions]


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, num_generations=4,
                per_device_train_batch_size=8, max_completion_length=4, logging_steps=1,
                disable_tqdm=True, learning_rate=1e-3)  # fmt: skip
    return GRPOConfig(**{**base, **kw})


def test_transformers_callback_sees_state_and_stops_training(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class StopAtTwo(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(("log", state.global_step, logs["step"], kwargs["model"] is not None))

        def on_step_end(self, args, state, control, **kwargs):
            seen.append(("step", state.global_step, state.max_steps, args.max_steps))
            if state.global_step == 2:
                control.should_training_stop = True
            return control

    trainer = GRPOTrainer(str(tiny_model_dir), _lowercase, args=_cfg(tmp_path, max_steps=6),
                          train_dataset=PROMPTS, callbacks=[StopAtTwo()])  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2
    assert ("step", 1, 6, 6) in seen and ("step", 2, 6, 6) in seen
    assert ("log", 2, 2, True) in seen
    assert [r["step"] for r in trainer.state.log_history] == [1, 2]


def test_peft_config_and_optimizers_arguments(tiny_model_dir, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    trainer = GRPOTrainer(str(tiny_model_dir), _lowercase, args=_cfg(tmp_path),
                          train_dataset=PROMPTS, peft_config=lora)  # fmt: skip
    cfg = trainer.policy.adapter_config["lora_parameters"]
    assert trainer.policy.kind == "lora" and cfg["rank"] == 4 and cfg["scale"] == 2.0
    assert all(k.endswith("q_proj") for k in cfg["keys"])
    with pytest.raises(ConfigError, match="use_dora"):
        GRPOTrainer(str(tiny_model_dir), _lowercase, args=_cfg(tmp_path), train_dataset=PROMPTS,
                    peft_config=LoraConfig(use_dora=True))  # fmt: skip
    with pytest.raises(ConfigError, match="use_lora=False"):
        GRPOTrainer(str(tiny_model_dir), _lowercase, args=_cfg(tmp_path, use_lora=False),
                    train_dataset=PROMPTS, peft_config=lora)  # fmt: skip
    sgd = optim.SGD(learning_rate=0.5)
    trainer = GRPOTrainer(str(tiny_model_dir), _lowercase, args=_cfg(tmp_path),
                          train_dataset=PROMPTS, optimizers=(sgd, None))  # fmt: skip
    assert trainer.optimizer is sgd and trainer.policy.kind == "full"
    with pytest.raises(ConfigError, match="optimizers\\[1\\]"):
        GRPOTrainer(str(tiny_model_dir), _lowercase, args=_cfg(tmp_path), train_dataset=PROMPTS,
                    optimizers=(None, object()))  # fmt: skip


def test_evaluate_reports_the_training_metrics_prefixed(tiny_model_dir, tmp_path):
    trainer = GRPOTrainer(str(tiny_model_dir), _lowercase, args=_cfg(tmp_path, beta=0.04),
                          train_dataset=PROMPTS,
                          eval_dataset={"small": PROMPTS[:2], "more": PROMPTS[2:6]})  # fmt: skip
    trainer.train()
    out = trainer.evaluate()
    train_keys = {k for k in trainer.state.log_history[-1] if k not in ("step", "epoch")}
    for name in ("small", "more"):
        keys = {k.removeprefix(f"eval_{name}_") for k in out if k.startswith(f"eval_{name}_")}
        assert {"loss", "reward", "kl", "entropy", "completions/mean_length"} <= keys
        assert {"rewards/_lowercase/mean", "reward_std"} <= keys
        assert keys <= train_keys | {"rewards/_lowercase/std"}, keys - train_keys
    # The same model and eval key: evaluating twice gives the same numbers.
    assert trainer.evaluate(PROMPTS[:2]) == trainer.evaluate(PROMPTS[:2])


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees GRPOConfig's once-per-process warnings afresh."""
    import grpo.config

    monkeypatch.setattr(grpo.config, "_WARNED", set())


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(loss_type="dapo", importance_sampling_level="sequence"), "GSPO paper"),
        (dict(loss_type="luspo"), "mirror the paper"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "VESPO computes"),
    ],
)
def test_trl_warnings(kw, needle):
    with pytest.warns(UserWarning, match=needle):
        GRPOConfig(**kw, seed=17)


def test_reward_functions_see_the_trainers_state(tiny_model_dir, tmp_path):
    seen = []

    def watcher(completions, trainer_state=None, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps,
                     len(trainer_state.log_history), trainer_state.max_completion_length))  # fmt: skip
        return [0.0 for _ in completions]

    trainer = GRPOTrainer(str(tiny_model_dir), [_lowercase, watcher], args=_cfg(tmp_path),
                          train_dataset=PROMPTS)  # fmt: skip
    trainer.train()
    # Scored before each step: steps done so far, and the records logged so far.
    assert seen == [(0, 3, 0, 4), (1, 3, 1, 4), (2, 3, 2, 4)]
