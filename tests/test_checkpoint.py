"""Checkpoints: bit-exact round trip, mlx-lm adapter format, atomic writes, clear errors."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import grpo  # noqa: F401
from grpo.config import GRPOConfig
from grpo.core.optim import make_optimizer
from grpo.core.state import init_state
from grpo.io import checkpoint as ck
from grpo.io.checkpoint import (
    CheckpointError,
    full_adapter_config,
    load_checkpoint,
    save_checkpoint,
)
from grpo.io.model import prepare_policy

TOKENS = mx.array([[3, 14, 15, 9, 26, 5, 35]])


def _perturbed(tree, seed):
    flat = tree_flatten(tree)
    keys = mx.random.split(mx.random.key(seed), len(flat))
    from mlx.utils import tree_unflatten

    return tree_unflatten(
        [
            (k, v + 0.05 * mx.random.normal(v.shape, key=kk).astype(v.dtype))
            for (k, v), kk in zip(flat, keys, strict=True)
        ]
    )


def _lora_state(model_dir, *, seed=0):
    model, _ = mlx_lm.load(str(model_dir))
    cfg = GRPOConfig(use_lora=True, lora_rank=4, per_device_train_batch_size=8)
    pol = prepare_policy(model, cfg, key=mx.random.key(seed), base=str(model_dir))
    opt = make_optimizer(cfg, total_steps=10)
    state = init_state(pol.params, opt, key=mx.random.key(seed + 1))
    # Non-trivial contents: nonzero lora_b and moments, a later step.
    moments = {k: v for k, v in state.opt_state.items() if k not in ("step", "learning_rate")}
    opt_state = {
        **_perturbed(moments, 5),
        "step": mx.array(7, mx.uint64),
        "learning_rate": mx.array(3e-4),
    }
    state = state._replace(
        params=_perturbed(state.params, seed + 2), opt_state=opt_state, step=mx.array(7, mx.int32)
    )
    return model, pol, state


def _assert_tree_equal(a, b):
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.array(fa[k]), np.array(fb[k]), err_msg=k)


def test_round_trip_is_bit_exact(tiny_model_dir, tmp_path):
    _, pol, state = _lora_state(tiny_model_dir)
    extra = {"sampler": {"epoch": 1, "position": 5}, "config": {"beta": 0.0}}
    path = save_checkpoint(
        tmp_path / "checkpoint-7", state, adapter_config=pol.adapter_config, trainer_state=extra
    )
    template = state._replace(params=tree_map(mx.zeros_like, state.params))
    loaded, meta = load_checkpoint(path, template)
    _assert_tree_equal(loaded.params, state.params)
    _assert_tree_equal(loaded.opt_state, state.opt_state)
    np.testing.assert_array_equal(np.array(loaded.key), np.array(state.key))
    assert loaded.key.dtype == mx.uint32 and loaded.step.item() == 7
    assert meta["sampler"] == {"epoch": 1, "position": 5} and meta["step"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_lora_checkpoint_loads_in_mlx_lm(tiny_model_dir, tmp_path):
    model, pol, state = _lora_state(tiny_model_dir)
    model.update(state.params)
    want = model(TOKENS)
    path = save_checkpoint(tmp_path / "checkpoint-7", state, adapter_config=pol.adapter_config)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["rank"] == 4
    reloaded, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(path))
    got = reloaded(TOKENS)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    base, _ = mlx_lm.load(str(tiny_model_dir))
    assert np.abs(np.array(base(TOKENS)) - np.array(want)).max() > 1e-3  # adapters matter


def test_full_checkpoint_loads_in_mlx_lm(tiny_model_dir, tmp_path):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    cfg = GRPOConfig(use_lora=False, per_device_train_batch_size=8)
    pol = prepare_policy(model, cfg, key=mx.random.key(0))
    state = init_state(
        _perturbed(pol.params, 3), make_optimizer(cfg, total_steps=4), key=mx.random.key(0)
    )
    model.update(state.params)
    want = model(TOKENS)
    acfg = full_adapter_config(len(model.layers), base=str(tiny_model_dir))
    path = save_checkpoint(tmp_path / "checkpoint-1", state, adapter_config=acfg)
    reloaded, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(path))
    np.testing.assert_allclose(np.array(reloaded(TOKENS)), np.array(want), rtol=1e-5, atol=1e-6)


def test_missing_incomplete_corrupt_and_mismatched(tiny_model_dir, tmp_path):
    _, pol, state = _lora_state(tiny_model_dir)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "checkpoint-99", state)
    path = save_checkpoint(tmp_path / "checkpoint-7", state, adapter_config=pol.adapter_config)

    (path / "optimizer.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, state)

    path = save_checkpoint(tmp_path / "checkpoint-7", state, adapter_config=pol.adapter_config)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, state)

    path = save_checkpoint(tmp_path / "checkpoint-7", state, adapter_config=pol.adapter_config)
    (path / "adapters.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path, state)

    path = save_checkpoint(tmp_path / "checkpoint-8", state, adapter_config=pol.adapter_config)
    other = dict(tree_flatten(state.params))
    name = next(iter(other))
    wrong = state._replace(params={"only": other[name]})
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path, wrong)


def test_output_path_that_is_a_file(tiny_model_dir, tmp_path):
    _, pol, state = _lora_state(tiny_model_dir)
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save_checkpoint(f / "checkpoint-1", state, adapter_config=pol.adapter_config)


def test_crash_mid_write_keeps_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    _, pol, state = _lora_state(tiny_model_dir)
    path = save_checkpoint(tmp_path / "checkpoint-7", state, adapter_config=pol.adapter_config)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    calls = []

    def dying_fsync(p):
        calls.append(p)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ck, "_fsync_file", dying_fsync)
    newer = state._replace(params=_perturbed(state.params, 11))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint-7", newer, adapter_config=pol.adapter_config)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint-8", newer, adapter_config=pol.adapter_config)
    assert calls
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not (tmp_path / "checkpoint-8").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]
    loaded, _ = load_checkpoint(path, state)
    _assert_tree_equal(loaded.params, state.params)


def test_latest_and_rotation(tiny_model_dir, tmp_path):
    _, pol, state = _lora_state(tiny_model_dir)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.latest_checkpoint(tmp_path)
    for s in (2, 10, 4):
        save_checkpoint(tmp_path / f"checkpoint-{s}", state, adapter_config=pol.adapter_config)
    (tmp_path / "checkpoint-12").mkdir()  # incomplete: ignored
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-10"
    deleted = ck.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["checkpoint-2"]
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
