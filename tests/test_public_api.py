"""The public API re-exported from ``grpo`` resolves, and ``core`` stays pure."""

import ast
import pathlib

import pytest

import grpo

CORE = pathlib.Path(grpo.__file__).parent / "core"
FORBIDDEN = ("grpo.io", "grpo.trainer", "grpo.cli", "grpo.config", "rich", "datasets")


@pytest.mark.parametrize("name", [n for n in grpo.__all__ if n != "__version__"])
def test_every_exported_name_resolves(name):
    assert getattr(grpo, name) is not None


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_thing"):
        grpo.no_such_thing  # noqa: B018


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_io_trainer_or_cli(path):
    bad = [m for m in _imports(path) if m.startswith(FORBIDDEN)]
    assert not bad, f"{path.name} imports {bad}"


IO = pathlib.Path(grpo.__file__).parent / "io"
IO_FORBIDDEN = ("grpo.trainer", "grpo.cli", "grpo.config", "grpo.tasks", "grpo.default_job")


@pytest.mark.parametrize("path", sorted(IO.glob("*.py")), ids=lambda p: p.name)
def test_io_never_imports_the_facade_or_cli(path):
    bad = [m for m in _imports(path) if m.startswith(IO_FORBIDDEN)]
    bad += ["grpo"] if "grpo" in list(_imports(path)) else []
    assert not bad, f"{path.name} imports {bad}"


def test_trainer_runs_the_public_pieces_a_custom_loop_uses(tiny_model_dir, tmp_path, monkeypatch):
    """The notebook and docs/all-of-grpo.md compose these same functions."""
    from helpers import PROMPTS, tiny_args

    import grpo.evaluate
    import grpo.trainer as trainer_module

    calls = {}
    for name in ("pad_rollout", "loss_batch", "micro_batches", "per_micro", "decode_rollout",
                 "eos_token_ids", "make_train_step", "make_optimizer", "init_state", "rollout",
                 "score", "grpo_loss", "evaluate_rewards"):  # fmt: skip
        real = getattr(trainer_module, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(trainer_module, name, spy)
        public = (
            grpo.evaluate.evaluate_rewards if name == "evaluate_rewards" else getattr(grpo, name)
        )
        assert public is real  # the very function the package exports

    def lowercase(completions, **kwargs):
        return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in completions]

    args = tiny_args(tmp_path, max_steps=2, beta=0.04)
    trainer = trainer_module.GRPOTrainer(str(tiny_model_dir), lowercase, args=args,
                                         train_dataset=PROMPTS)  # fmt: skip
    trainer.train()
    trainer.evaluate(PROMPTS[:2])  # the same sampling-and-scoring chain as `grpo eval`
    missing = [n for n in ("pad_rollout", "loss_batch", "micro_batches", "per_micro",
                           "decode_rollout", "eos_token_ids", "make_train_step",
                           "make_optimizer", "init_state", "evaluate_rewards", "score",
                           "grpo_loss")
               if not calls.get(n)]  # fmt: skip
    assert not missing, missing


def test_the_loss_split_keeps_every_import_path():
    import grpo.core.forward as forward
    import grpo.core.loss as loss
    import grpo.core.surrogates as surrogates
    import grpo.losses

    for name in loss.__all__:
        assert getattr(loss, name) is not None, name
    for name in grpo.losses.__all__:
        assert getattr(grpo.losses, name) is getattr(loss, name), name
    assert loss.kl_k3 is surrogates.kl_k3 is grpo.kl_k3
    assert loss.LOSSES is surrogates.LOSSES
    assert loss.completion_logprobs is forward.completion_logprobs is grpo.completion_logprobs
    assert loss.lora_reference_params is forward.lora_reference_params


def test_loss_levels_import_downwards():
    """Array pieces know no model; the forward knows no loss; the assembly uses both."""

    def top_level_imports(name):
        tree = ast.parse((CORE / f"{name}.py").read_text())
        return {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names
        }

    grpo_modules = {m for m in top_level_imports("surrogates") if m.startswith("grpo")}
    assert grpo_modules == {"grpo.core.numerics"}
    assert not {"grpo.core.loss", "grpo.core.surrogates"} & top_level_imports("forward")
    assert {"grpo.core.surrogates", "grpo.core.forward"} <= top_level_imports("loss")


def test_rewards_do_not_import_tasks():
    """Tasks use the rewards (exact_match); the rewards never need the tasks."""
    rewards = pathlib.Path(grpo.__file__).parent / "rewards.py"
    bad = [m for m in _imports(rewards) if m.startswith(("grpo.tasks", "grpo.agent_tasks"))]
    assert not bad, bad
