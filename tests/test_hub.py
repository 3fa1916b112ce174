"""push_to_hub / hub_* through huggingface_hub against a fake endpoint, and the model card."""

import json

import pytest
import yaml
from fake_hub import FakeHub
from helpers import tiny_args

import grpo  # noqa: F401
from grpo.io.hub import base_model_id
from grpo.trainer import GRPOTrainer

DATA = [{"prompt": p} for p in ["ab", "cd", "ef", "gh"]]


def reward_len(completions, **kw):
    return [float(len(c)) for c in completions]


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.server.shutdown()


def _card(path):
    text = path.read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_save_model_writes_trls_model_card(tmp_path, tiny_model_dir):
    args = tiny_args(tmp_path / "my-run", max_steps=1, hub_token="hf_secret")
    trainer = GRPOTrainer(
        str(tiny_model_dir), reward_funcs=reward_len, args=args, train_dataset=DATA
    )
    out = trainer.save_model()
    meta, body = _card(out / "README.md")
    assert meta["model_name"] == "my-run" and meta["library_name"] == "mlx"
    assert {"generated_from_trainer", "trl", "grpo", "mlx-grpo"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local directory is not a hub id (as TRL)
    assert "mlx-grpo" in body and "This model was trained with GRPO" in body
    assert "@article{shao2024deepseekmath" in body and "@software{vonwerra2020trl" in body
    config = json.loads(body.split("```json\n", 1)[1].split("```", 1)[0])
    assert config["max_steps"] == 1 and config["learning_rate"] == 1e-2
    assert config["hub_token"] == "<HUB_TOKEN>" and "hf_secret" not in body
    assert "seed" not in config or config["seed"] != 42  # only fields that differ from defaults


def test_base_model_id():
    assert base_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert base_model_id(None) is None


def test_push_to_hub_against_a_fake_endpoint(tmp_path, tiny_model_dir, hub):
    args = tiny_args(
        tmp_path / "run",
        max_steps=2,
        save_steps=2,
        push_to_hub=True,
        hub_model_id="org/tiny-grpo",
        hub_token="hf_test",
        hub_private_repo=True,
        hub_strategy="checkpoint",
    )
    trainer = GRPOTrainer(
        str(tiny_model_dir), reward_funcs=reward_len, args=args, train_dataset=DATA
    )
    assert hub.requests == []  # nothing is sent before the first push
    trainer.train()
    trainer.save_model()
    trainer.push_to_hub(dataset_name="org/prompts")

    (created,) = hub.repos.items()  # created once, though pushed four times
    assert created[0] == "org/tiny-grpo"
    assert {k: created[1].get(k) for k in ("name", "organization", "visibility")} == {
        "name": "tiny-grpo", "organization": "org", "visibility": "private"
    }  # fmt: skip
    assert all(h.get("authorization") == "Bearer hf_test" for _, _, h in hub.requests)
    summaries = [c["summary"] for c in hub.commits]
    assert summaries == [
        "Training in progress, step 2",  # the checkpoint's weights and the card, at the root
        "Training in progress, step 2",  # hub_strategy="checkpoint": the folder, as last-checkpoint
        "Model save",
        "End of training",
    ]
    root, last, saved, end = (c["files"] for c in hub.commits)
    assert {"README.md", "adapters.safetensors", "adapter_config.json"} <= set(root)
    assert not any(k.startswith("checkpoint-") for c in hub.commits for k in c["files"])
    assert {"last-checkpoint/optimizer.safetensors", "last-checkpoint/trainer_state.json"} <= set(last)  # fmt: skip
    out = tmp_path / "run"
    assert end["adapters.safetensors"] == (out / "adapters.safetensors").read_bytes()
    assert saved["adapters.safetensors"] == end["adapters.safetensors"]
    meta, body = _card(out / "README.md")
    assert end["README.md"] == (out / "README.md").read_bytes()
    assert meta["datasets"] == ["org/prompts"] or meta["datasets"] == "org/prompts"
    assert meta["model_name"] == "tiny-grpo" and 'adapter_path="org/tiny-grpo"' in body
    assert trainer.hub_model_id == "org/tiny-grpo"


def test_hub_strategy_is_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"hub_strategy must be one of .* got 'sometimes'"):
        GRPOTrainer(
            "/nonexistent/model",
            reward_funcs=reward_len,
            args=tiny_args(tmp_path, hub_strategy="sometimes"),
            train_dataset=DATA,
        )
