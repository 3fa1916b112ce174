"""``grpo`` command line: typed flags, YAML precedence, one-line usage errors, one smoke run."""

import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import attrs
import pytest

from grpo import cli
from grpo.config import GRPOConfig
from grpo.default_job import DEFAULT_TRAIN_ARGS


def run_main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(argv, capsys) -> str:
    code, _, err = run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- flags generated from GRPOConfig ----------------------------------------------------------


def test_every_grpoconfig_field_is_a_flag():
    parser = cli.build_parser()
    train = parser.parse_args(["train"])._subparsers["train"]
    options = {o for a in train._actions for o in a.option_strings}
    for field in attrs.fields(GRPOConfig):
        assert f"--{field.name}" in options, field.name


def test_flags_parse_to_field_types():
    argv = [
        "train",
        "--learning_rate", "1e-5",
        "--use-lora", "false",
        "--num_generations", "4",
        "--reward_weights", "1,0.5",
        "--report_to", "none,wandb",
        "--epsilon_high", "none",
        "--log_completions",
    ]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    got = cli.flag_overrides(args)
    assert got == {
        "learning_rate": 1e-5,
        "use_lora": False,
        "num_generations": 4,
        "reward_weights": (1.0, 0.5),
        "report_to": ("none", "wandb"),
        "epsilon_high": None,
        "log_completions": True,
    }
    hints = typing.get_type_hints(GRPOConfig)
    assert isinstance(got["learning_rate"], float) and hints["learning_rate"] is float
    # Unset flags stay unset, so YAML and defaults are not clobbered by argparse defaults.
    assert cli.flag_overrides(cli.build_parser().parse_args(["train"])) == {}


@pytest.mark.parametrize(
    "tp, value, expected",
    [
        (int, "3", 3),
        (float, "1e-4", 1e-4),  # PyYAML reads 1e-4 as a string
        (float, 2, 2.0),
        (bool, "Yes", True),
        (int | None, "null", None),
        (tuple[float, ...] | None, [1, 2], (1.0, 2.0)),
        (str, "dapo", "dapo"),
    ],
)
def test_convert_accepts(tp, value, expected):
    got = cli.convert(tp, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "tp, value, reason",
    [
        (int, "2.5", "expected an integer"),
        (int, 2.5, "expected an integer"),
        (int, True, "expected an integer"),
        (float, "abc", "expected a number"),
        (bool, "maybe", "expected true or false"),
        (bool, 1, "expected true or false"),
        (str, 3, "expected a string"),
        (float, None, "None is not allowed"),
    ],
)
def test_convert_rejects(tp, value, reason):
    with pytest.raises(ValueError, match=reason):
        cli.convert(tp, value)


# -- usage errors: exit 2, one line, no traceback ---------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--learning_rat", "1"], "unknown option --learning_rat; did you mean --learning_rate?"),
        (["train", "--max_steps", "2.5"], "invalid value '2.5' for --max_steps (expected an integer)"),
        (["train", "--use_lora", "maybe"], "invalid value 'maybe' for --use_lora"),
        (["train", "--num_generations", "1"], "at least 2 generations per prompt"),
        (["train", "--loss_type", "nope"], "loss_type must be one of"),
        (["train", "--config", "no/such.yaml"], "--config: no such file: no/such.yaml"),
        (["train", "--dataset", "missing.jsonl"], "--dataset: no such file or directory: missing.jsonl"),
        (["train", "--model", "./no_model_here"], "--model: no such file or directory"),
        (["train", "--reward", "no_such_module:fn"], "--reward: cannot load reward function"),
        (["train", "--reward", "not_a_reward"], "unknown reward function 'not_a_reward'"),
        (["eval", "--adapter_path", "no/such/dir"], "--adapter_path: no such directory"),
        (["eval", "--bogus"], "grpo eval: unknown option --bogus"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in usage_error(argv, capsys)


def test_config_errors_name_the_field(tmp_path, capsys):
    cases = {
        "learning_rate: 1e-4\nbogus_field: 3\n": "unknown GRPOConfig field 'bogus_field'",
        "learnin_rate: 1e-4\n": "did you mean learning_rate?",
        "beta: abc\n": "invalid value for beta: expected a number",
        "[1, 2\n": "not valid YAML",
        "- a\n- b\n": "expected a mapping",
        "num_generations: 3\n": "must be divisible by num_generations=3",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        line = usage_error(["train", "--config", str(path)], capsys)
        assert message in line, line


def test_dataset_without_reward_is_a_usage_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "answer": "x"}) + "\n")
    assert "--reward is required" in usage_error(["train", "--dataset", str(data)], capsys)


def test_existing_run_in_output_dir_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    line = usage_error(["train", "--output_dir", str(out)], capsys)
    assert "already holds a run" in line and "--overwrite_output_dir" in line


def test_subprocess_usage_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "grpo", "train", "--beta", "-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: Invalid GRPOConfig: beta must be >= 0, got beta=-1.0"
    ]


# -- precedence: defaults < YAML < flags ------------------------------------------------------------


def resolved(argv):
    args = cli.build_parser().parse_args(argv)
    return cli.Run(args, command=args.command)


def test_flags_override_yaml_override_default_job(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("learning_rate: 1e-3\nbeta: 0.2\nloss_type: grpo\ntemperature: 0.7\n")
    run = resolved(["train", "--config", str(cfg_file), "--beta", "0.05", "--temperature=0.9"])
    cfg = run.config
    assert cfg.beta == 0.05 and cfg.temperature == 0.9  # flag beats YAML
    assert cfg.learning_rate == 1e-3 and cfg.loss_type == "grpo"  # YAML beats default job
    assert cfg.num_generations == DEFAULT_TRAIN_ARGS["num_generations"]  # default job
    assert cfg.max_steps == DEFAULT_TRAIN_ARGS["max_steps"]
    assert run.default_model and run.task == "reverse" and run.reward == "exact_match"


def test_user_model_starts_from_grpoconfig_defaults(tmp_path, tiny_model_dir):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {tiny_model_dir}\ndataset: sort\nmax_steps: 7\n")
    run = resolved(["train", "--config", str(cfg_file)])
    assert not run.default_model and run.model == str(tiny_model_dir) and run.task == "sort"
    defaults = GRPOConfig()
    assert run.config.max_steps == 7
    assert run.config.learning_rate == defaults.learning_rate
    assert defaults.use_lora is None and run.config.use_lora is True  # the CLI's LoRA default
    # A command-line --model beats the YAML one.
    run = resolved(["train", "--config", str(cfg_file), "--model", str(tmp_path)])
    assert run.model == str(tmp_path)


def test_reward_margin():
    records = [{"step": i, "reward": r} for i, r in enumerate([0.1, 0.2] + [0.5] * 16 + [0.8, 0.9])]
    first, last = cli.reward_margin(records)
    assert first == pytest.approx(0.15) and last == pytest.approx(0.85)


# -- one end-to-end smoke run of the real default job, shortened --------------------------------


def test_default_job_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_GRPO_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "grpo", "train",
        "--max_steps", "3", "--logging_steps", "1", "--warm_start_steps", "5",
        "--per_device_train_batch_size", "16", "--output_dir", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warm start: 5 supervised steps on generated examples" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for name in ("reward", "loss", "kl", "grad_norm", "tokens_per_second"):
            assert math.isfinite(r[name]), (name, r)
        assert 0.0 <= r["reward"] <= 1.0
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapters.safetensors").exists()
    assert len(list((tmp_path / "cache" / "mlx-grpo").iterdir())) == 1
    # The closing lines compare base and trained on the task's held-out set.
    assert "held-out prompts" in proc.stdout and "(base) ->" in proc.stdout

    # The trained weights load back for `grpo eval` (same cache, so no second warm start).
    proc = subprocess.run(
        [sys.executable, "-m", "grpo", "eval", "--warm_start_steps", "5", "--limit", "4",
         "--adapter_path", str(out), "--output_dir", str(tmp_path / "ev")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cached" in proc.stdout
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "out"]
    assert 0.0 <= report["models"][1]["rewards"]["exact_match"] <= 1.0


# -- docs stay in step with the code ----------------------------------------------------------


def test_api_doc_lists_every_export_and_config_field():
    import grpo

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    missing = [n for n in grpo.__all__ if n != "__version__" and f"`{n}" not in text]
    missing += [f.name for f in attrs.fields(GRPOConfig) if f"| `{f.name}` |" not in text]
    assert not missing, f"docs/api.md lacks {missing}; run python docs/gen_api.py"


def test_every_grpoconfig_field_has_help_text():
    missing = [f.name for f in attrs.fields(GRPOConfig) if not f.metadata.get("help")]
    assert not missing, f"add a line to grpo.config._HELP for {missing}"
    assert set(cli.FIELD_HELP) <= {f.name for f in attrs.fields(GRPOConfig)}
