"""Bad input is rejected before step 1 with a message naming the field and the value.

Every case goes through the public API (``GRPOConfig(...)``, ``GRPOTrainer(...)``,
``trainer.train(...)``). Trainer-level cases also prove that no rollout ran: the module's
``rollout`` is replaced by a function that fails the test if it is ever called.
"""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import json
import re
import shutil

import datasets
import pytest
from helpers import PROMPTS, tiny_args

import grpo.trainer as trainer_module
from grpo.io.checkpoint import CheckpointError
from grpo.trainer import GRPOTrainer


def zeros(completions, **kwargs):
    return [0.0] * len(completions)


def _args(tmp_path, **kw):
    return tiny_args(
        kw.pop("output_dir", tmp_path / "out"),
        **{
            "max_steps": 1,
            "max_prompt_length": 16,
            "learning_rate": 1e-6,
            "logging_steps": 10,
            "lora_rank": 4,
            "save_steps": 1,
            **kw,
        },
    )


@pytest.fixture(autouse=True)
def no_rollout(monkeypatch):
    """Fail the test if any validation error comes only after generation started."""

    def forbidden(*args, **kwargs):
        raise AssertionError("rollout ran before the input was validated")

    monkeypatch.setattr(trainer_module, "rollout", forbidden)


def _trainer(model_dir, tmp_path, *, reward=zeros, data=PROMPTS, **kw):
    return GRPOTrainer(str(model_dir), reward, args=_args(tmp_path, **kw), train_dataset=data)


# -- config (GRPOConfig) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,needles",
    [
        (dict(num_generations=1), ["at least 2 generations", "num_generations=1"]),
        (
            dict(num_generations=3, per_device_train_batch_size=8),
            ["generation_batch_size=8", "divisible by num_generations=3"],
        ),
        (dict(loss_type="ppo"), ["loss_type must be one of", "'dapo'", "loss_type='ppo'"]),
        (dict(scale_rewards="mean"), ["scale_rewards must be one of", "scale_rewards='mean'"]),
        (
            dict(importance_sampling_level="seq"),
            ["importance_sampling_level must be one of", "importance_sampling_level='seq'"],
        ),
        (dict(epsilon=0.0), ["epsilon must be > 0", "epsilon=0.0"]),
        (dict(epsilon=-0.2), ["epsilon must be > 0", "epsilon=-0.2"]),
        (dict(epsilon_high=0.0), ["epsilon_high must be > 0", "epsilon_high=0.0"]),
        (dict(beta=-0.01), ["beta must be >= 0", "beta=-0.01"]),
        (dict(max_completion_length=0), ["max_completion_length", ">= 1", "=0"]),
        (dict(reward_weights=[1.0, float("nan")]), ["reward_weights", "finite"]),
    ],
)
def test_config_rejects(tmp_path, kw, needles):
    with pytest.raises(ValueError) as e:
        _args(tmp_path, **kw)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


@pytest.mark.parametrize(
    "field,value",
    [("beta", float("nan")), ("temperature", float("inf")), ("entropy_coef", float("inf")),
     ("learning_rate", float("inf"))],
)  # fmt: skip
def test_each_problem_is_reported_once(tmp_path, field, value):
    # A loss field is checked by LossConfig alone, the rest by GRPOConfig alone: one line each.
    with pytest.raises(ValueError) as e:
        _args(tmp_path, **{field: value})
    problems = [line for line in str(e.value).splitlines() if line.strip().startswith("- ")]
    assert problems == [f"  - {field} must be a finite number, got {field}={value!r}"]


def test_valid_config_is_accepted(tmp_path):
    # The same knobs at legal values pass, so the cases above fail for the stated reason.
    cfg = _args(tmp_path, epsilon=0.1, epsilon_high=0.3, beta=0.0, loss_type="grpo")
    assert cfg.resolved_epsilon_high == 0.3


# -- dataset -------------------------------------------------------------------------------


def test_missing_prompt_column_is_reported_before_loading_the_model(tmp_path):
    # The model path does not exist: the dataset error must come first (no model load).
    with pytest.raises(ValueError, match=r"no 'prompt' column; its columns are \['question'\]"):
        _trainer(tmp_path / "no-model", tmp_path, data=[{"question": "a"}] * 8)


@pytest.mark.parametrize(
    "data", [[], datasets.Dataset.from_dict({"prompt": []})], ids=["list", "Dataset"]
)
def test_empty_dataset(tiny_model_dir, tmp_path, data):
    with pytest.raises(ValueError, match=r"the dataset is empty \(0 rows"):
        _trainer(tiny_model_dir, tmp_path, data=data)


CHATS = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in PROMPTS]


@pytest.mark.parametrize(
    "good,bad", [(PROMPTS, ""), (PROMPTS, None), (CHATS, [])], ids=["str", "none", "messages"]
)
def test_empty_prompt_in_any_row(tiny_model_dir, tmp_path, good, bad):
    # Row 8 would not be sampled by the first step; it is still caught up front.
    data = datasets.Dataset.from_list(good + [{"prompt": bad}])
    with pytest.raises(ValueError, match=r"row 8 has an empty 'prompt'"):
        _trainer(tiny_model_dir, tmp_path, data=data)
    _trainer(tiny_model_dir, tmp_path, data=good)  # the same rows without it are fine


def test_prompt_longer_than_the_context(tiny_model_dir, tmp_path):
    long = {"prompt": "x" * 3000}  # char-level tokenizer: 3000 tokens > 2048 context
    with pytest.raises(ValueError) as e:
        _trainer(tiny_model_dir, tmp_path, data=PROMPTS + [long], max_prompt_length=None)
    msg = str(e.value)
    assert "row 8 has 3000 tokens" in msg
    assert "max_position_embeddings=2048" in msg and "max_completion_length=4" in msg
    # With max_prompt_length set, long prompts keep their last tokens instead (TRL).
    _trainer(tiny_model_dir, tmp_path, data=PROMPTS + [long], max_prompt_length=16)


def test_completion_budget_larger_than_the_context(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"max_completion_length=4000 leaves no room.*2048"):
        _trainer(tiny_model_dir, tmp_path, max_completion_length=4000)


# -- reward functions ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [42, [zeros, 42]], ids=["alone", "in-list"])
def test_reward_not_callable(tmp_path, spec):
    with pytest.raises(
        TypeError, match=r"(42.*not callable|must be a callable or a string, got 42)"
    ):
        _trainer(tmp_path / "no-model", tmp_path, reward=spec)


def test_unknown_builtin_reward_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown reward function 'acuracy'; known built-ins:"):
        _trainer(tmp_path / "no-model", tmp_path, reward="acuracy")


def test_reward_weights_length(tmp_path):
    with pytest.raises(ValueError, match=r"got 3 reward weights for 2 reward functions"):
        _trainer(tmp_path / "no-model", tmp_path, reward=[zeros, zeros], reward_weights=[1, 2, 3])


def test_reward_needs_a_missing_column(tmp_path):
    def needs_answer(completions, answer, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"'needs_answer' requires column\(s\) \['answer'\]"):
        _trainer(tmp_path / "no-model", tmp_path, reward=needs_answer)


# -- adapters ------------------------------------------------------------------------------


def test_lora_target_modules_not_in_the_model(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"\['qkv'\] matches no linear layer.*self_attn.q_proj"):
        _trainer(tiny_model_dir, tmp_path, lora_target_modules=["qkv"])


def test_lora_num_layers_exceeds_the_model(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"lora_num_layers=9 exceeds the model's 2"):
        _trainer(tiny_model_dir, tmp_path, lora_num_layers=9)


# -- output_dir ----------------------------------------------------------------------------


def test_output_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"output_dir=.*file' exists and is a file"):
        _trainer(tmp_path / "no-model", tmp_path, output_dir=str(f))
    with pytest.raises(ValueError, match=r"output_dir=.*cannot be created: .*file' is a file"):
        _trainer(tmp_path / "no-model", tmp_path, output_dir=str(f / "run"))


# -- resuming ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """A real one-step LoRA (rank 4) checkpoint."""
    tmp = tmp_path_factory.mktemp("ckpt")
    trainer = GRPOTrainer(
        str(tiny_model_dir), zeros, args=_args(tmp), train_dataset=PROMPTS, group=None
    )
    trainer.train()
    return tmp / "out" / "checkpoint-1"


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "copy" / "checkpoint-1"
    shutil.copytree(checkpoint, dst)
    return dst


def _resume_fails(tiny_model_dir, tmp_path, path, match, **kw):
    trainer = _trainer(tiny_model_dir, tmp_path, **kw)
    with pytest.raises(CheckpointError, match=match):
        trainer.train(resume_from_checkpoint=str(path) if path is not True else True)
    # Never a silent fresh start: nothing trained, nothing saved.
    assert trainer.global_step == 0
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_resume_from_a_missing_checkpoint(tiny_model_dir, tmp_path):
    _resume_fails(tiny_model_dir, tmp_path, tmp_path / "checkpoint-7", r"checkpoint not found")
    _resume_fails(tiny_model_dir, tmp_path, True, r"no complete checkpoint-\* directory")


def test_resume_from_a_corrupt_weights_file(tiny_model_dir, tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path)
    data = (path / "adapters.safetensors").read_bytes()
    (path / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    _resume_fails(tiny_model_dir, tmp_path, path, r"adapters.safetensors is corrupt or unreadable")


def test_resume_from_a_corrupt_trainer_state(tiny_model_dir, tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path)
    (path / "trainer_state.json").write_text('{"step": 1, "ke')
    _resume_fails(tiny_model_dir, tmp_path, path, r"trainer_state.json is corrupt or unreadable")


def test_resume_from_an_incomplete_checkpoint(tiny_model_dir, tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path)
    (path / "optimizer.safetensors").unlink()
    _resume_fails(
        tiny_model_dir, tmp_path, path, r"incomplete: missing \['optimizer.safetensors'\]"
    )


def test_resume_adapters_of_another_rank(tiny_model_dir, tmp_path, checkpoint):
    _resume_fails(
        tiny_model_dir,
        tmp_path,
        checkpoint,
        r"checkpoint-1 was saved with lora_rank=4, this run has lora_rank=8",
        lora_rank=8,
    )


def test_resume_lora_adapters_into_a_full_finetune(tiny_model_dir, tmp_path, checkpoint):
    _resume_fails(
        tiny_model_dir,
        tmp_path,
        checkpoint,
        r"checkpoint-1 was saved with use_lora=True, this run has use_lora=False",
        use_lora=False,
    )


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(num_generations=2), "saved with num_generations=4, this run has num_generations=2"),
        (dict(seed=1), "saved with seed=0, this run has seed=1"),
        (dict(shuffle_dataset=False), "saved with shuffle_dataset=True"),
        # Another sampler: the resumed run would not draw the trajectories it would have.
        (dict(rollout_quantization=8), "saved with rollout_quantization=None, this run has"),
    ],
)
def test_resume_with_other_run_settings_names_the_field(
    tiny_model_dir, tmp_path, checkpoint, kw, needle
):
    _resume_fails(tiny_model_dir, tmp_path, checkpoint, re.escape(needle), **kw)


def test_resume_with_a_different_sampler_layout_is_a_checkpoint_error(
    tiny_model_dir, tmp_path, checkpoint
):
    # A checkpoint whose recorded config lacks the field still meets the sampler's check.
    path = _copy(checkpoint, tmp_path)
    state = json.loads((path / "trainer_state.json").read_text())
    del state["config"]
    (path / "trainer_state.json").write_text(json.dumps(state))
    _resume_fails(
        tiny_model_dir,
        tmp_path,
        path,
        r"saved sampler has batch_size=2, this one has batch_size=4",
        num_generations=2,
    )


def test_a_good_checkpoint_resumes(tiny_model_dir, tmp_path, checkpoint):
    # Control for the cases above: the untouched checkpoint loads (step 1, then done).
    trainer = _trainer(tiny_model_dir, tmp_path)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.global_step == 1
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 1
