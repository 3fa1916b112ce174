"""grpo eval / train's eval data: determinism, --run discovery, held-out sets, the plot."""

import json

import numpy as np
import pytest

from grpo import cli
from grpo import evaluate as E
from grpo.config import GRPOConfig
from grpo.default_job import default_dataset, default_eval_dataset
from grpo.tasks import exact_match, make_dataset

SMALL = [
    "--num_generations", "4", "--per_device_train_batch_size", "8",
    "--max_completion_length", "4", "--learning_rate", "1e-2", "--disable_tqdm",
    "--seed", "0", "--per_device_eval_batch_size", "16",
]  # fmt: skip


def _rows(tmp_path, n=12):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_dataset("reverse", n, seed=5)))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """A 2-step LoRA run of the tiny model with a checkpoint after each step."""
    tmp = tmp_path_factory.mktemp("run")
    data, out = _rows(tmp), tmp / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--reward",
            "exact_match", "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out),
            "--eval_split", "0.25", "--eval_strategy", "steps", "--eval_steps", "1", *SMALL]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_sample_model_same_seed_is_identical(tiny_model):
    model, tokenizer = tiny_model
    cfg = GRPOConfig(max_completion_length=4, per_device_eval_batch_size=8, num_generations=4)
    rows = make_dataset("reverse", 5, seed=1)
    a, b, c = (
        E.sample_model(model, tokenizer, rows, [exact_match], cfg, n=4, seed=s) for s in (0, 0, 1)
    )
    for field in ("rewards", "lengths", "truncated", "greedy_rewards"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.rewards.shape == (5, 4, 1) and a.greedy_rewards.shape == (5, 1)
    # Another seed draws other samples (the greedy completions stay the same).
    assert not np.array_equal(a.lengths, c.lengths) or not np.array_equal(a.rewards, c.rewards)
    np.testing.assert_array_equal(a.greedy_rewards, c.greedy_rewards)


def test_eval_run_finds_every_checkpoint_and_repeats_exactly(trained_run, capsys):
    assert (trained_run / "run_config.json").is_file()
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_reward" in r] == [1, 2]  # --eval_split's curve
    reports = []
    for _ in range(2):
        assert cli.main(["eval", "--run", str(trained_run), "--k", "2"]) == 0
        reports.append(json.loads((trained_run / "eval.json").read_text()))
    out = capsys.readouterr().out
    names = [m["name"] for m in reports[0]["models"]]
    assert names == ["base", "checkpoint-1", "checkpoint-2", "final"]
    assert reports[0] == reports[1]
    assert (trained_run / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "checkpoint-2" in out and "pass@2" in out
    # The run's settings were used: its eval split (3 of 12 rows), its sampling budget.
    assert reports[0]["prompts"] == 3
    assert reports[0]["sampling"]["max_completion_length"] == 4
    final, ckpt2 = reports[0]["models"][3], reports[0]["models"][2]
    assert {k: v for k, v in final.items() if k not in ("name", "adapter_path")} == {
        k: v for k, v in ckpt2.items() if k not in ("name", "adapter_path")
    }  # the final weights are the last checkpoint's
    for m in reports[0]["models"]:
        assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0


def test_eval_same_adapter_twice_gives_identical_rows(trained_run, tiny_model_dir, tmp_path):
    data = _rows(tmp_path, n=4)
    argv = ["eval", "--model", str(tiny_model_dir), "--dataset", str(data), "--reward",
            "exact_match", "--adapter_path", str(trained_run), "--adapter_path",
            str(trained_run), "--output_dir", str(tmp_path), *SMALL[:6]]  # fmt: skip
    assert cli.main(argv) == 0
    base, a, b = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert "vs_first" not in base and a == b


def test_eval_usage_errors(tmp_path, capsys):
    assert cli.main(["eval", "--run", str(tmp_path / "nope")]) == 2
    assert "--run: no such directory" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(tmp_path)]) == 2
    assert "neither run_config.json nor a checkpoint" in capsys.readouterr().err


def test_held_out_split_is_seeded_disjoint_and_complete():
    rows = [{"prompt": str(i)} for i in range(40)]
    train, held = E.held_out_split(rows, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert sorted(train + held, key=lambda r: int(r["prompt"])) == rows
    assert E.held_out_split(rows, 0.1, seed=3) == (train, held)
    assert E.held_out_split(rows, 0.1, seed=4)[1] != held
    assert len(E.held_out_split(rows[:3], 0.01)[1]) == 1  # at least one row
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        E.held_out_split(rows, 1.0)


def test_task_eval_sets_are_held_out():
    for task in ("reverse", "sort"):
        seen = {r["prompt"] for r in default_dataset(task)}
        held = default_eval_dataset(task, n=64)
        prompts = [r["prompt"] for r in held]
        assert len(set(prompts)) == 64 and not seen & set(prompts)
        assert held == default_eval_dataset(task, n=64)


def test_summarize_hand_checked():
    rewards = np.array([[[1.0, 1.0], [0.5, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # [B=2, n=2, F=2]
    samples = E.Samples(
        rewards=rewards,
        lengths=np.array([[2, 4], [6, 8]]),
        truncated=np.array([[False, True], [False, False]]),
        greedy_rewards=np.array([[1.0, 0.0], [0.0, 1.0]]),
        names=("think_format", "answer_match"),
    )
    m = E.summarize(samples, k=2)["metrics"]
    assert m["pass_reward"] == "answer_match"  # the accuracy reward, not the format one
    assert m["pass@1"] == pytest.approx(0.75)  # answer_match: [1, 0] and [1, 1]
    assert m["pass@2"] == pytest.approx(1.0)
    assert m["greedy_accuracy"] == pytest.approx(0.5)
    assert m["reward"] == pytest.approx((2.0 + 0.5 + 1.0 + 1.0) / 4)
    assert m["mean_length"] == 5.0 and m["truncation_rate"] == 0.25
    assert E.summarize(samples, k=1, pass_reward="think_format")["metrics"]["pass@1"] == 0.25


def test_reward_curve_shows_the_eval_curve(tmp_path, monkeypatch):
    from grpo.io import plot

    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "reward": 0.2},
        {"step": 1, "eval_reward": 0.3},
        {"step": 2, "reward": 0.4},
    ]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    drawn = []
    real = plot.curve
    monkeypatch.setattr(plot, "curve", lambda r, name: drawn.append(name) or real(r, name))
    plot.plot_reward_curve(metrics, tmp_path / "c.png")
    assert "eval_reward" in drawn and plot.curve(lines, "eval_reward") == ([1], [0.3])


# -- grpo generate ------------------------------------------------------------------------------


def test_generate_greedy_matches_the_training_sampler(tiny_model_dir, tiny_model, capsys):
    import attrs
    import mlx.core as mx

    from grpo.core.rollout import rollout
    from grpo.io.data import decode_completions, encode_prompt
    from grpo.trainer import eos_token_ids

    model, tokenizer = tiny_model
    argv = ["generate", "--model", str(tiny_model_dir), "--dataset", "sort", "--limit", "2",
            "--greedy", "--max_completion_length", "6"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    prompts = [r["prompt"] for r in default_eval_dataset("sort", n=2)]
    cfg = GRPOConfig(max_completion_length=6)
    sampling = attrs.evolve(
        cfg.to_sampling_config(eos_token_ids=eos_token_ids(tokenizer)), group_size=1,
        temperature=0.0,
    )  # fmt: skip
    ids = [encode_prompt(p, tokenizer) for p in prompts]
    roll = rollout(model.parameters(), mx.random.key(0), ids, model=model, sampling=sampling)
    lengths = np.array(roll.completion_lengths)
    rows = [np.array(roll.completion_ids)[i, : lengths[i]].tolist() for i in range(2)]
    texts = decode_completions(rows, tokenizer)
    for i, (p, text) in enumerate(zip(prompts, texts, strict=True)):
        streamed, stats = out.split(f"--- prompt {i}: {p!r}\n", 1)[1].split("\n[", 1)
        # mlx-lm's stream drops the EOS token's text; the rollout keeps its id.
        assert text.startswith(streamed) and len(text) - len(streamed) <= 20
        assert stats.startswith(f"{lengths[i]} tokens")


def test_generate_applies_the_chat_template(tiny_model_dir, monkeypatch, capsys):
    seen = []
    real = E.prompt_encoder

    def spy(*a, **kw):
        enc = real(*a, **kw)
        return lambda prompt, row=None: seen.append(prompt) or enc(prompt, row=row)

    monkeypatch.setattr("grpo.evaluate.prompt_encoder", spy)
    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "hi",
        "--max_completion_length",
        "3",
    ]
    assert cli.main(argv) == 0
    assert seen == [[{"role": "user", "content": "hi"}]]
    assert cli.main([*argv, "--raw"]) == 0
    assert seen[-1] == "hi"
