"""GRPOConfig takes every TRL 1.16 field: wired with its meaning, or accepted with a warning.

tests/data/trl_1_16_grpo_fields.json is TRL 1.16's own field list and defaults, read off
``trl.GRPOConfig`` by tests/data/gen_trl_fields.py.
"""

import json
import warnings
from pathlib import Path

import attrs
import pytest
from helpers import PROMPTS, tiny_args

import grpo  # noqa: F401
from grpo.config import GRPOConfig, ignored_settings
from grpo.flow import Flow

TRL = json.loads((Path(__file__).parent / "data" / "trl_1_16_grpo_fields.json").read_text())
TRL_FIELDS = {row["name"]: row["default"] for row in TRL["fields"]}
OURS = attrs.fields_dict(GRPOConfig)
# Fields another open issue wires (MoE router loss, tool calling); listed so that this test
# fails once they land and the list is stale.
PENDING: set[str] = set()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees GRPOConfig's once-per-process warnings afresh."""
    import grpo.config

    monkeypatch.setattr(grpo.config, "_WARNED", set())


def test_every_trl_field_is_a_grpoconfig_field():
    missing = sorted(set(TRL_FIELDS) - set(OURS))
    assert missing == sorted(PENDING), missing


def test_trl_defaults_construct_a_valid_config():
    # Every TRL field at TRL's own default, at once: no TypeError, no ValueError.
    values = {k: v for k, v in TRL_FIELDS.items() if k in OURS}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TRL's defaults are not "settings" to warn about
        cfg = GRPOConfig(**values)
    assert cfg.output_dir == "trainer_output" and cfg.report_to == ()
    assert cfg.pad_to_multiple_of is None  # TRL's "auto" pads only on AWS Neuron


@pytest.mark.parametrize("name", sorted(n for n, f in OURS.items() if f.metadata.get("ignored")))
def test_each_ignored_field_warns_with_its_reason(name):
    default = OURS[name].default
    value = {bool: lambda d: not d, int: lambda d: d + 7, float: lambda d: d + 0.5}.get(
        type(default), lambda d: "x" if not isinstance(d, tuple) else ("x",)
    )(default)
    if default is None:
        value = "x"
    with pytest.warns(UserWarning, match=name) as record:
        GRPOConfig(**{name: value}, seed=hash(name) % 10_000)
    message = str(record[0].message)
    assert OURS[name].metadata["ignored"][:40] in message
    assert len([r for r in record if "ignored on MLX" in str(r.message)]) == 1


def test_ignored_warning_is_emitted_once_per_setting():
    with pytest.warns(UserWarning, match="vllm_server_port=12391"):
        GRPOConfig(vllm_server_port=12391)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRPOConfig(vllm_server_port=12391, seed=5)  # the same ignored settings: already said


def test_wired_fields_are_not_reported_as_ignored():
    cfg = GRPOConfig(bf16=True, logging_strategy="epoch", data_seed=3, disable_dropout=True,
                     chat_template_kwargs={"enable_thinking": False})  # fmt: skip
    assert ignored_settings(cfg) == []


def test_plain_strings_where_trl_takes_lists():
    cfg = GRPOConfig(report_to="wandb", lora_target_modules="q_proj")
    assert cfg.report_to == ("wandb",) and cfg.lora_target_modules == ("q_proj",)
    assert GRPOConfig(report_to="none").report_to == ()


def test_fractional_intervals_are_ratios_of_the_run():
    cfg = GRPOConfig(logging_steps=0.1, save_steps=0.25, eval_steps=0.5)
    assert (cfg.interval("logging_steps", 95), cfg.interval("save_steps", 95)) == (10, 24)
    assert cfg.interval("eval_steps", 95) == 48
    assert GRPOConfig().interval("eval_steps", 100) == 10  # None: logging_steps
    with pytest.raises(ValueError, match="logging_steps=2.5"):
        GRPOConfig(logging_steps=2.5)


def test_compute_dtype_and_generation_kwargs():
    assert GRPOConfig(bf16=True).compute_dtype == "bfloat16"
    assert GRPOConfig(model_init_kwargs={"torch_dtype": "float16"}).compute_dtype == "float16"
    assert GRPOConfig(model_init_kwargs='{"dtype": "auto"}').compute_dtype is None
    with pytest.raises(ValueError, match="bf16=True and fp16=True"):
        GRPOConfig(bf16=True, fp16=True)
    cfg = GRPOConfig(top_k=0, generation_kwargs={"top_k": 7, "min_p": 0.1})
    sampling = cfg.to_sampling_config()
    assert (sampling.top_k, sampling.min_p) == (7, 0.1)
    with pytest.raises(ValueError, match="set temperature instead"):
        GRPOConfig(generation_kwargs={"temperature": 0.7})
    assert GRPOConfig(lora_dropout=0.1, disable_dropout=True).lora_dropout == 0.0
    assert GRPOConfig(num_generations_eval=1).num_generations_eval == 1


def _flow(**kw):
    return Flow.from_config(GRPOConfig(**kw), max_steps=20, epoch_steps=6)


def test_flow_follows_transformers_default_flow():
    steps = range(1, 21)
    assert [s for s in steps if _flow(logging_steps=5).log_at(s)] == [5, 10, 15, 20]
    first = _flow(logging_steps=5, logging_first_step=True)
    assert [s for s in steps if first.log_at(s)] == [1, 5, 10, 15, 20]
    assert not any(_flow(logging_strategy="no").log_at(s) for s in steps)
    assert [s for s in steps if _flow(eval_strategy="steps", eval_steps=8).eval_at(s)] == [
        8,
        16,
        20,
    ]
    assert not any(_flow(eval_steps=8).eval_at(s) for s in steps)  # eval_strategy="no"
    epoch = _flow(save_strategy="epoch", eval_strategy="epoch", logging_strategy="epoch")
    bounds = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]  # generation batches of 4 steps
    assert [b for a, b in bounds if epoch.save_at_boundary(a, b)] == [8, 12, 20]
    assert [b for a, b in bounds if epoch.eval_at_boundary(a, b)] == [8, 12, 20]
    assert [b for a, b in bounds if epoch.log_at_boundary(a, b)] == [8, 12, 20]
    assert not any(epoch.log_at(s) for s in steps[:-1])
    assert not _flow(save_strategy="no").saves
    with pytest.raises(ValueError, match="streamed"):
        Flow.from_config(GRPOConfig(save_strategy="epoch"), max_steps=5, epoch_steps=None)


def test_trainer_runs_the_strategies(tiny_model_dir, tmp_path):
    from grpo.io.logging import read_metrics
    from grpo.trainer import GRPOTrainer

    def lowercase(completions, **kwargs):
        return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in completions]

    # 8 prompts, 2 per generation batch of 1 step: an epoch is 4 steps.
    args = tiny_args(tmp_path, max_steps=8, logging_strategy="epoch", logging_first_step=True,
                     save_strategy="no", eval_strategy="epoch", eval_on_start=True,
                     bf16=True, data_seed=5)  # fmt: skip
    trainer = GRPOTrainer(str(tiny_model_dir), lowercase, args=args, train_dataset=PROMPTS,
                          eval_dataset=PROMPTS[:2])  # fmt: skip
    assert trainer.flow.epoch_steps == 4
    base = {str(v.dtype) for k, v in _float_leaves(trainer.model) if "lora" not in k}
    assert base == {"mlx.core.bfloat16"}  # the LoRA adapters stay float32
    trainer.train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 4, 8]
    assert [r["step"] for r in records if "eval_reward" in r] == [0, 4, 8]
    assert not list(tmp_path.glob("checkpoint-*"))  # save_strategy="no"
    with pytest.raises(ValueError, match="eval_dataset"):
        GRPOTrainer(str(tiny_model_dir), lowercase, args=tiny_args(tmp_path, eval_strategy="steps"),
                    train_dataset=PROMPTS)  # fmt: skip


def _float_leaves(model):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.parameters()) if "float" in str(v.dtype)]


def test_porting_page_field_table_is_current():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "docs" / "gen_porting.py"), "--check"])
    assert proc.returncode == 0, "docs/porting-from-trl.md is stale: run python docs/gen_porting.py"
