"""An output directory's runs never lose or mix weights, every error is one line, and nothing
bad is accepted silently.

Faults are injected deterministically: a second process that holds the lock and waits on
its stdin, reward functions that raise or block on a call count or an Event, signals a run
sends itself at a given step, and a tmpfs too small for a checkpoint. No assertion depends
on how fast the machine is.
"""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import mlx.core as mx
import numpy as np
import pytest

from helpers import PROMPTS, flat_numpy, tiny_args
from grpo.core.score import MAX_ABS_REWARD, score
from grpo.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GRPOError,
    NumericsError,
    OutputDirInUse,
    RewardError,
)
from grpo.io import runlock
from grpo.io.checkpoint import list_checkpoints, load_checkpoint, rotate_checkpoints, run_id_of
from grpo.io.logging import read_metrics
from grpo.trainer import GRPOTrainer, NonFiniteError


def lengths(completions, **kwargs):
    return [float(len(c)) for c in completions]


def zeros(completions, **kwargs):
    return [0.0] * len(completions)


def _trainer(model_dir, out, reward=lengths, data=PROMPTS, **kw):
    return GRPOTrainer(
        str(model_dir), reward, args=tiny_args(out, **kw), train_dataset=data, group=None
    )


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _steps(out):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(out)]


# -- the exception hierarchy -------------------------------------------------------------------


def test_one_hierarchy_exported_from_grpo_and_compatible_with_valueerror():
    for cls in (ConfigError, DataError, RewardError, CheckpointError, NumericsError):
        assert issubclass(cls, GRPOError) and getattr(grpo, cls.__name__) is cls
    for cls in (ConfigError, DataError, RewardError, CheckpointError):
        assert issubclass(cls, ValueError)
    assert issubclass(NonFiniteError, NumericsError) and issubclass(
        NumericsError, FloatingPointError
    )
    assert issubclass(OutputDirInUse, ConfigError)
    assert grpo.GRPOError is GRPOError
    from grpo.core.score import RewardError as from_score
    from grpo.io.checkpoint import CheckpointError as from_checkpoint

    assert from_score is RewardError and from_checkpoint is CheckpointError


# -- one run per output_dir --------------------------------------------------------------------


HOLDER = textwrap.dedent(
    """
    import sys
    from grpo.io import runlock
    runlock.acquire(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
    """
)


@pytest.fixture
def holder(tmp_path):
    """A second process holding ``tmp_path/out``'s lock until stdin closes or it is killed."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"  # blocks until it holds the lock
    yield out, proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_a_second_run_is_refused_naming_the_holder_then_the_kernel_frees_the_lock(
    holder, tiny_model_dir
):
    out, proc = holder
    trainer = _trainer(tiny_model_dir, out)
    with pytest.raises(OutputDirInUse, match=rf"in use by another run \(pid {proc.pid}\)"):
        trainer.train()
    assert trainer.global_step == 0 and not list(out.glob("checkpoint-*"))
    assert not (out / "metrics.jsonl").exists()
    # SIGKILL runs no cleanup at all; the kernel still drops the lock with the process.
    proc.kill()
    proc.wait()
    runlock.acquire(out)
    runlock.release(out)


def test_the_lock_is_released_when_train_ends_and_is_reentrant(tmp_path):
    out = tmp_path / "out"
    runlock.acquire(out)
    runlock.acquire(out)  # the CLI holds it around the trainer, which takes it again
    runlock.release(out)
    probe = [
        sys.executable,
        "-c",
        "import sys; from grpo.io import runlock; runlock.acquire(sys.argv[1])",
    ]
    refused = subprocess.run([*probe, str(out)], capture_output=True, text=True)
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr
    runlock.release(out)
    assert subprocess.run([*probe, str(out)], capture_output=True).returncode == 0


def test_grpo_train_on_a_locked_output_dir_exits_2_in_one_line(holder, cli_env):
    out, proc = holder
    done = _cli(out, cli_env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"(pid {proc.pid})" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# -- run ids, overwrite, rotation, resume ------------------------------------------------------


def test_overwrite_removes_the_earlier_run_rotation_keeps_ours_and_resume_continues_ours(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "out"
    kw = dict(save_steps=2, save_total_limit=2, lr_scheduler_type="constant")
    old = _trainer(tiny_model_dir, out, max_steps=8, **kw)
    old.train()
    assert _steps(out) == [6, 8]
    (out / "notes.txt").write_text("the user's own file stays")

    # Without overwrite_output_dir a fresh run is refused and nothing changes.
    with pytest.raises(ConfigError, match=r"already holds another run's files \(checkpoint-6"):
        _trainer(tiny_model_dir, out, max_steps=4, seed=1, **kw).train()
    assert _steps(out) == [6, 8] and {run_id_of(p) for p in list_checkpoints(out)} == {old.run_id}

    new = _trainer(tiny_model_dir, out, max_steps=4, seed=1, overwrite_output_dir=True, **kw)
    new.train()
    assert new.run_id != old.run_id
    # The earlier run's higher-numbered checkpoints are gone, so rotation kept ours.
    assert _steps(out) == [2, 4]
    assert {run_id_of(p) for p in list_checkpoints(out)} == {new.run_id}
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "notes.txt").exists()

    # resume_from_checkpoint=True continues *this* run: the same weights as running it
    # straight to step 6.
    resumed = _trainer(tiny_model_dir, out, max_steps=6, seed=1, **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.run_id == new.run_id and _steps(out) == [4, 6]
    straight = _trainer(tiny_model_dir, tmp_path / "straight", max_steps=6, seed=1, **kw)
    straight.train()
    _assert_same(flat_numpy(resumed.state.params), flat_numpy(straight.state.params))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_rotation_never_deletes_another_runs_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    first = _trainer(tiny_model_dir, out, max_steps=2, save_steps=1)
    first.train()
    mine = out / "checkpoint-9"
    shutil.copytree(out / "checkpoint-2", mine)
    state = json.loads((mine / "trainer_state.json").read_text())
    (mine / "trainer_state.json").write_text(json.dumps({**state, "run_id": "someone-else"}))
    assert rotate_checkpoints(out, keep=1, run_id=first.run_id) == [out / "checkpoint-1"]
    assert _steps(out) == [2, 9]


def test_resume_with_a_malformed_trainer_state_is_a_one_line_exit_2(tmp_path, cli_env):
    out = tmp_path / "run"
    assert _cli(out, cli_env, "--max_steps", "2", "--save_steps", "1").returncode == 0
    assert _steps(out) == [1, 2]  # the newest is the corrupt one: never skipped silently
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2, "ke')
    done = _cli(out, cli_env, "--max_steps", "4", "--resume_from_checkpoint")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "checkpoint-2/trainer_state.json is corrupt or unreadable" in lines[0]
    )
    # And with another seed: refused before any work, naming the field.
    (out / "checkpoint-2").rename(tmp_path / "broken")
    assert _cli(tmp_path / "ok", cli_env, "--max_steps", "2", "--save_steps", "2").returncode == 0
    done = _cli(
        tmp_path / "ok", cli_env, "--max_steps", "4", "--seed", "5", "--resume_from_checkpoint"
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "was saved with seed=0, this run has seed=5" in lines[0]


# -- a failure mid-run saves the last good state ---------------------------------------------


def test_a_failing_reward_saves_the_last_good_state_and_resuming_it_matches(
    tiny_model_dir, tmp_path
):
    calls = [0]

    def flaky(completions, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # scoring the 4th generation batch: after step 3, before step 4
            raise ZeroDivisionError("boom")
        return lengths(completions)

    out = tmp_path / "out"
    failed = _trainer(tiny_model_dir, out, reward=flaky, save_steps=100)
    with pytest.raises(RewardError, match=r"'flaky' raised ZeroDivisionError") as e:
        failed.train()
    assert e.value.checkpoint == out / "checkpoint-3"
    assert f"saved the last good state (step 3) to {out / 'checkpoint-3'}" in e.value.__notes__
    state, meta = load_checkpoint(out / "checkpoint-3", failed.state)
    _assert_same(flat_numpy(state.params), flat_numpy(failed.state.params))
    assert meta["sampler"]["position"] == 3 * 2  # rolled back to the boundary: 3 batches
    resumed = _trainer(tiny_model_dir, out, save_steps=100)
    resumed.train(resume_from_checkpoint=True)
    straight = _trainer(tiny_model_dir, tmp_path / "straight", save_steps=100)
    straight.train()
    _assert_same(flat_numpy(resumed.state.params), flat_numpy(straight.state.params))
    _assert_same(flat_numpy(resumed.state.opt_state), flat_numpy(straight.state.opt_state))


def test_nothing_is_saved_when_no_step_was_taken(tiny_model_dir, tmp_path):
    def broken(completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardError) as e:
        _trainer(tiny_model_dir, tmp_path / "out", reward=broken).train()
    assert e.value.checkpoint is None and not list_checkpoints(tmp_path / "out")


REWARD_FILE = textwrap.dedent(
    """
    calls = [0]

    def flaky(completions, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise ZeroDivisionError("boom")
        return [float(len(c)) for c in completions]
    """
)


@pytest.mark.parametrize("debug", [False, True])
def test_grpo_train_reward_error_is_one_line_exit_1_with_the_saved_checkpoint(
    tmp_path, cli_env, debug
):
    rewards = tmp_path / "rw.py"
    rewards.write_text(REWARD_FILE)
    out = tmp_path / "run"
    extra = ["--dataset", "reverse", "--reward", f"{rewards}:flaky", "--save_steps", "100"]
    done = _cli(out, cli_env, *extra, *(["--debug"] if debug else []))
    assert done.returncode == 1, done.stderr
    assert _steps(out) == [3]
    lines = done.stderr.strip().splitlines()
    if debug:
        assert "Traceback" in done.stderr and "ZeroDivisionError: boom" in done.stderr
    else:
        assert len(lines) == 1, done.stderr
    assert lines[-1].startswith("error: reward function 'flaky' raised ZeroDivisionError")
    assert f"Saved the last good state to {out / 'checkpoint-3'}" in lines[-1]
    assert "--resume_from_checkpoint" in lines[-1] and "Hint: " in lines[-1]


# -- validation before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["learning_rate", "weight_decay", "lora_alpha", "num_train_epochs", "temperature"]
)
def test_non_finite_numeric_fields_name_the_field(field, tmp_path):
    with pytest.raises(ConfigError, match=rf"{field} must be a finite number, got {field}=inf"):
        tiny_args(tmp_path, **{field: float("inf")})


def test_grpo_train_with_infinite_epochs_is_one_line_exit_2(tmp_path, cli_env):
    done = _cli(tmp_path / "run", cli_env, "--max_steps", "-1", "--num_train_epochs", "inf")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: Invalid GRPOConfig: num_train_epochs must be a finite number, got "
        "num_train_epochs=inf"
    ]


def test_mixed_prompt_formats_are_refused_naming_the_first_row_of_each(tiny_model_dir, tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    rows = [*PROMPTS[:3], {"prompt": chat}, *PROMPTS[3:]]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for data in (rows, str(jsonl)):  # a list of dicts; a .jsonl file (loaded as Json)
        with pytest.raises(DataError, match=r"row 0 is a plain string, row 3 is conversational"):
            _trainer(tiny_model_dir, tmp_path, data=data)


def test_chat_role_and_template_errors_are_data_errors_before_any_rollout(
    tiny_model_dir, tmp_path, monkeypatch
):
    import grpo.trainer as trainer_module

    def forbidden(*args, **kwargs):
        raise AssertionError("rollout ran before the data was validated")

    monkeypatch.setattr(trainer_module, "rollout", forbidden)
    ends_with_system = [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in PROMPTS]
    bad_role = [*rows[:5], {"prompt": ends_with_system}, *rows[6:]]
    with pytest.raises(DataError, match=r"row 5: invalid role in the last message: 'system'"):
        _trainer(tiny_model_dir, tmp_path, data=bad_role)
    trainer = _trainer(tiny_model_dir, tmp_path, data=rows)  # the tiny tokenizer's template works
    bare = trainer.processing_class._tokenizer
    bare.chat_template = None
    with pytest.raises(DataError, match=r"row 0: .*chat[ _]template"):
        GRPOTrainer(
            trainer.model,
            lengths,
            args=tiny_args(tmp_path),
            train_dataset=rows,
            processing_class=trainer.processing_class,
            group=None,
        )


def test_rewards_beyond_float32_advantages_are_refused_naming_function_and_row():
    def huge(completions, **kwargs):
        return [1.0, 2.0, 1e20, 3.0]

    with pytest.raises(RewardError, match=r"'huge' returned 1e\+20 at row 2, beyond"):
        score(["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, [huge])
    ok = score(["p"] * 4, ["a"] * 4, [[1]] * 4, [lambda completions, **k: [MAX_ABS_REWARD] * 4])
    assert np.array(ok.rewards_per_func).max() == np.float32(MAX_ABS_REWARD)


def test_all_none_rewards_warn_with_trls_wording(tiny_model_dir, tmp_path, caplog):
    def none_for_row_0(completions, **kwargs):
        return [None] + [float(len(c)) for c in completions[1:]]

    trainer = _trainer(tiny_model_dir, tmp_path, reward=none_for_row_0, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="grpo"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "returned None" in r.getMessage()]
    assert len(warned) == 1  # once per run, not at every step
    head, row, tail = warned[0].split("\n")
    assert head == "All reward functions returned None for the following kwargs:"
    assert tail == "Please ensure that at least one reward function returns a valid reward."
    assert "'prompt':" in row and "'completion':" in row


def test_zero_reward_variance_for_n_steps_in_a_row_warns_once(tiny_model_dir, tmp_path, caplog):
    trainer = _trainer(tiny_model_dir, tmp_path, reward=zeros, max_steps=5)
    trainer._watch.patience = 3
    with caplog.at_level(logging.WARNING, logger="grpo"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "zero variance" in r.getMessage()]
    assert len(warned) == 1 and "for 3 steps in a row" in warned[0]
    # A reward that varies never warns.
    caplog.clear()
    trainer = _trainer(tiny_model_dir, tmp_path / "varied", reward=lengths, max_steps=5)
    trainer._watch.patience = 3
    with caplog.at_level(logging.WARNING, logger="grpo"):
        trainer.train()
    assert not [r for r in caplog.records if "zero variance" in r.getMessage()]


# -- reward_timeout ------------------------------------------------------------------------------


def test_a_hung_reward_fails_the_step_naming_the_function(tiny_model_dir, tmp_path):
    never = threading.Event()  # never set while the call is pending: the call cannot return

    def hangs(completions, **kwargs):
        never.wait()
        return [0.0] * len(completions)

    try:
        with pytest.raises(
            RewardError, match=r"'hangs' did not return within reward_timeout=0.05s"
        ):
            score(["p"] * 2, ["a", "b"], [[1], [2]], [hangs], timeout=0.05)
        trainer = _trainer(tiny_model_dir, tmp_path, reward=hangs, reward_timeout=0.05)
        with pytest.raises(RewardError, match=r"'hangs' did not return within"):
            trainer.train()
    finally:
        never.set()  # let the abandoned threads finish


def test_reward_timeout_also_bounds_async_rewards_and_spares_fast_ones():
    import asyncio

    async def sleeps_forever(completions, **kwargs):
        await asyncio.Event().wait()

    with pytest.raises(RewardError, match=r"'sleeps_forever' did not return within"):
        score(["p"] * 2, ["a", "b"], [[1], [2]], [sleeps_forever], timeout=0.05)
    fast = score(["p"] * 2, ["a", "bb"], [[1], [2]], [lengths], timeout=60)
    assert np.array(fast.rewards_per_func).ravel().tolist() == [1.0, 2.0]


def test_reward_timeout_is_a_flag_and_must_be_positive(tmp_path):
    from grpo import cli

    args = cli.build_parser().parse_args(["train", "--reward_timeout", "2.5"])
    assert cli.flag_overrides(args) == {"reward_timeout": 2.5}
    with pytest.raises(ConfigError, match=r"reward_timeout must be a number of seconds > 0"):
        tiny_args(tmp_path, reward_timeout=0)


# -- a full disk -------------------------------------------------------------------------------


def _tmpfs(mount, options):
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(done.stderr or done.stdout).strip()}")
    return mount


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: room for the lock, run.json and metrics, not for a checkpoint."""
    yield _tmpfs(tmp_path / "small", "size=1m")
    subprocess.run(["umount", str(tmp_path / "small")], check=False)


@pytest.fixture
def read_only_tmpfs(tmp_path):
    yield _tmpfs(tmp_path / "ro", "ro,size=64k")
    subprocess.run(["umount", str(tmp_path / "ro")], check=False)


def test_grpo_train_into_a_read_only_dir_is_one_line_exit_2(read_only_tmpfs, cli_env):
    out = read_only_tmpfs / "run"
    done = _cli(out, cli_env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: output_dir {out} is not writable: Read-only file system (EROFS). "
        "Hint: choose a writable output_dir (--debug prints the traceback)."
    ]


def test_grpo_train_on_a_full_disk_names_the_path_and_enospc_in_one_line(small_tmpfs, cli_env):
    out = small_tmpfs / "run"
    done = _cli(out, cli_env, "--max_steps", "4", "--save_steps", "2")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot write checkpoint {out / 'checkpoint-2'}: ")
    assert "No space left on device (ENOSPC" in lines[0]
    assert not list_checkpoints(out)
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".del-", ".old-"))]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


# -- the real `grpo train` ---------------------------------------------------------------------


FAST = [
    "--warm_start_steps", "0",
    "--max_steps", "6",
    "--per_device_train_batch_size", "16",
    "--num_generations", "4",
    "--max_completion_length", "4",
    "--logging_steps", "1",
    "--disable_tqdm",
]  # fmt: skip


def _cli(out, env, *extra):
    return subprocess.run(
        [sys.executable, "-m", "grpo", "train", *FAST, "--output_dir", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # a hang guard only
    )


def test_grpo_train_exit_codes_for_signals(tmp_path, cli_env):
    env = dict(cli_env, GRPO_TEST_SIGNAL_AT_STEP="2:INT")
    out = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [sys.executable, "-m", "grpo", "train", *FAST, "--output_dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"interrupted: training interrupted by SIGINT after step 2; saved {out / 'checkpoint-2'}"
    ]
    assert mx.load(str(out / "checkpoint-2" / "adapters.safetensors"))
