"""Every docs/recipes command runs, as written, on the tiny model with rows in its format."""

import json
import re
import shlex
from pathlib import Path

import pytest

from grpo import cli

RECIPES = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "docs" / "recipes").glob("*.md")
    if p.name != "README.md"
)  # fmt: skip
# Appended to each `grpo train` (later flags win): a two-step run of the tiny model.
SHRINK_TRAIN = [
    "--max_steps", "2", "--save_steps", "1", "--eval_steps", "1", "--num_generations", "2",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
    "--max_completion_length", "8", "--per_device_eval_batch_size", "8", "--disable_tqdm",
]  # fmt: skip
SHRINK_EVAL = ["--limit", "2", "--k", "2"]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)


def commands(text: str) -> list[list[str]]:
    return [shlex.split(b.replace("\\\n", " ")) for b in blocks(text, "sh")]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)  # the recipe must pass it; ValueError otherwise
    return argv[: i + 1] + [value] + argv[i + 2 :]


def test_every_recipe_is_found():
    assert {p.stem for p in RECIPES} >= {"gsm8k-math", "think-format", "code-unit-tests"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_commands_run(recipe, tiny_model_dir, tmp_path, capsys):
    text = recipe.read_text()
    (example,) = [json.loads(b) for b in blocks(text, "json")]
    data = tmp_path / "rows.jsonl"
    data.write_text((json.dumps(example) + "\n") * 8)
    cmds = commands(text)
    assert [c[:2] for c in cmds] == [["grpo", "train"], ["grpo", "eval"]], cmds
    train, ev = cmds
    out = str(tmp_path / "out")
    train = _set(_set(_set(train, "--model", str(tiny_model_dir)), "--dataset", str(data)),
                 "--output_dir", out)  # fmt: skip
    assert cli.main(train[1:] + SHRINK_TRAIN) == 0, capsys.readouterr().err
    records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_reward" in r for r in records)  # the recipe's eval split and schedule
    assert cli.main(_set(ev, "--run", out)[1:] + SHRINK_EVAL) == 0, capsys.readouterr().err
    report = json.loads((Path(out) / "eval.json").read_text())
    assert [m["name"] for m in report["models"]] == [
        "base",
        "checkpoint-1",
        "checkpoint-2",
        "final",
    ]
    assert report["reward"] == train[train.index("--reward") + 1]
