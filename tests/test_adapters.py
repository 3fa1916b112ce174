"""Continuing saved adapters, QLoRA saves that reload as trained, trust_remote_code."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from helpers import PROMPTS, flat_numpy, tiny_args

from grpo.io.model import load_trained, lora_layers
from grpo.trainer import GRPOTrainer

TOKENS = mx.array([[5, 40, 41, 77, 12, 9, 30, 31]])


def id_sum(completions, completion_ids, **kwargs):
    return [float(sum(ids)) for ids in completion_ids]


def _args(out, **kw):
    base = dict(max_steps=1, num_generations=2, per_device_train_batch_size=4, lora_rank=4)
    return tiny_args(out, **{**base, **kw})


def _trained_logits(trainer):
    trainer.model.update(trainer.state.params)
    trainer.model.eval()
    return np.array(trainer.model(TOKENS))


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    trainer = GRPOTrainer(str(tiny_model_dir), id_sum, args=_args(out), train_dataset=PROMPTS)
    trainer.train()
    trainer.save_model(out)
    return out, {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def _assert_continues(trainer, saved):
    params = flat_numpy(trainer.train_state.params)
    assert set(params) == set(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    # One adapter per adapted layer: the wrapped layer is never itself a LoRA layer.
    assert all(not hasattr(m.linear, "lora_a") for _, _, m in lora_layers(trainer.model))


def test_adapter_path_continues_the_saved_adapters(tiny_model_dir, first_run, tmp_path):
    out_a, saved = first_run
    # lora_rank=16 is ignored: rank and targets come from the saved adapter_config.json.
    args = _args(tmp_path, adapter_path=str(out_a), lora_rank=16)
    trainer = GRPOTrainer(str(tiny_model_dir), id_sum, args=args, train_dataset=PROMPTS)
    _assert_continues(trainer, saved)
    trainer.train()
    assert any(not np.array_equal(v, saved[k]) for k, v in flat_numpy(trainer.state.params).items())
    out_b = trainer.save_model(tmp_path / "grpo")
    config = json.loads((out_b / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 4
    loaded, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(out_b))
    np.testing.assert_allclose(np.array(loaded(TOKENS)), _trained_logits(trainer), atol=1e-5)


def test_a_model_already_carrying_adapters_trains_them(tiny_model_dir, first_run, tmp_path):
    out_a, saved = first_run
    model, tok = mlx_lm.load(str(tiny_model_dir), adapter_path=str(out_a))
    trainer = GRPOTrainer(
        model, id_sum, args=_args(tmp_path), train_dataset=PROMPTS, processing_class=tok
    )
    _assert_continues(trainer, saved)
    trainer.train()
    out = trainer.save_model(tmp_path / "grpo")
    loaded, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(out))
    np.testing.assert_allclose(np.array(loaded(TOKENS)), _trained_logits(trainer), atol=1e-5)


def test_adapter_path_from_cli_flag_and_yaml(tiny_model_dir, first_run, tmp_path):
    from grpo import cli

    out_a, _ = first_run
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ab"}\n')
    common = ["train", "--model", str(tiny_model_dir), "--dataset", str(data)]
    args = cli.build_parser().parse_args(
        [*common, "--reward", "exact_match", "--adapter_path", str(out_a)]
    )
    assert cli.Run(args, command="train").config.adapter_path == str(out_a)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"adapter_path: {out_a}\nreward: exact_match\n")
    args = cli.build_parser().parse_args([*common, "--config", str(yaml)])
    assert cli.Run(args, command="train").config.adapter_path == str(out_a)


def test_adapter_path_with_full_finetune_is_refused(tiny_model_dir, first_run, tmp_path):
    out_a, _ = first_run
    args = _args(tmp_path, adapter_path=str(out_a), use_lora=False)
    with pytest.raises(ValueError, match="fuse"):
        GRPOTrainer(str(tiny_model_dir), id_sum, args=args, train_dataset=PROMPTS)


def test_qlora_save_reloads_to_the_trained_logits(tiny_model_dir, tmp_path):
    args = _args(tmp_path, quantize_bits=4, quantize_group_size=32, learning_rate=5e-2)
    trainer = GRPOTrainer(str(tiny_model_dir), id_sum, args=args, train_dataset=PROMPTS)
    trainer.train()
    out = trainer.save_model(tmp_path / "qlora")
    want = _trained_logits(trainer)
    model, _ = load_trained(str(tiny_model_dir), str(out))
    np.testing.assert_allclose(np.array(model(TOKENS)), want, atol=1e-5)
    # The float base with the same adapters is a different model (why load_trained exists).
    plain, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(out))
    assert np.abs(np.array(plain(TOKENS)) - want).max() > 1e-3


def test_trust_remote_code_reaches_the_model_load(tiny_model_dir, monkeypatch):
    from grpo import cli
    from grpo.io import model as model_io

    seen = []
    real = mlx_lm.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlx_lm, "load", spy)
    model_io.load_model(str(tiny_model_dir), trust_remote_code=True)
    cli._load_model(str(tiny_model_dir), None, trust_remote_code=True)
    assert seen == [True, True]
