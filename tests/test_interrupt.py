"""Ctrl-C saves and exits 130; SIGKILL leaves a loadable checkpoint; resuming either one ends
with exactly the parameters (and metrics records) of an uninterrupted run.

In-process tests deliver real signals to this process (``os.kill(os.getpid(), ...)``) from
inside training (a callback between steps, a reward function during generation). The
subprocess tests run the real ``grpo train`` command, which signals itself at a chosen step
(``GRPO_TEST_SIGNAL_AT_STEP``), so no outcome depends on the machine's speed.
"""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from helpers import PROMPTS, flat_numpy, tiny_args
from grpo.io.checkpoint import REQUIRED, list_checkpoints, load_checkpoint
from grpo.io.faults import ENV
from grpo.io.runlock import LOCK_NAME
from grpo.io.logging import read_metrics
from grpo.io.signals import InterruptGuard, TrainingInterrupted
from grpo.trainer import GRPOTrainer


def lengths(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _args(out, **kw):
    return tiny_args(out, **{"lr_scheduler_type": "cosine", "save_steps": 100, **kw})


def _trainer(model_dir, out, reward=lengths, callbacks=(), **kw):
    return GRPOTrainer(
        str(model_dir),
        reward,
        args=_args(out, **kw),
        train_dataset=PROMPTS,
        callbacks=list(callbacks),
        group=None,
    )


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """Uninterrupted runs, by configuration, computed once."""
    cache = {}

    def run(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            t = _trainer(tiny_model_dir, tmp_path_factory.mktemp("straight"), **kw)
            t.train()
            cache[key] = (flat_numpy(t.state.params), flat_numpy(t.state.opt_state), t.log_history)
        return cache[key]

    return run


class SignalAtStep:
    """Send ``signum`` to this process when ``step`` finishes (between optimizer steps)."""

    def __init__(self, step, signum=signal.SIGINT):
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def _interrupt_then_resume(tiny_model_dir, out, *, callbacks=(), reward=lengths, **kw):
    first = _trainer(tiny_model_dir, out, reward=reward, callbacks=callbacks, **kw)
    with pytest.raises(TrainingInterrupted) as e:
        first.train()
    resumed = _trainer(tiny_model_dir, out, **kw)
    resumed.train(resume_from_checkpoint=True)
    return e.value, first, resumed


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_between_steps_saves_then_resume_matches(
    tiny_model_dir, tmp_path, straight, signum, code
):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    err, first, resumed = _interrupt_then_resume(
        tiny_model_dir, tmp_path, callbacks=[SignalAtStep(2, signum)]
    )
    assert isinstance(err, KeyboardInterrupt) and err.exit_code == code
    assert err.step == 2 and err.checkpoint == tmp_path / "checkpoint-2"
    assert first.global_step == 2
    state, meta = load_checkpoint(err.checkpoint, first.state)
    _assert_same(flat_numpy(state.params), flat_numpy(first.state.params))
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    params, opt, history = straight()
    assert resumed.global_step == 6
    _assert_same(flat_numpy(resumed.state.params), params)
    _assert_same(flat_numpy(resumed.state.opt_state), opt)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [r["loss"] for r in history]


def test_signal_during_generation_abandons_it_and_rolls_back(tiny_model_dir, tmp_path, straight):
    calls = [0]

    def interrupting(completions, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # scoring the 4th generation batch: after step 3, before step 4
            os.kill(os.getpid(), signal.SIGINT)
        return lengths(completions)

    err, first, resumed = _interrupt_then_resume(tiny_model_dir, tmp_path, reward=interrupting)
    assert err.step == 3 and first.global_step == 3
    # Rolled back to the boundary: the sampler has not consumed the abandoned batch.
    _, meta = load_checkpoint(err.checkpoint, first.state)
    assert meta["sampler"]["position"] == 3 * 2  # 3 batches of 2 prompts
    params, opt, _ = straight()
    _assert_same(flat_numpy(resumed.state.params), params)
    _assert_same(flat_numpy(resumed.state.opt_state), opt)


def test_signal_mid_generation_batch_finishes_its_steps(tiny_model_dir, tmp_path, straight):
    # Two optimizer steps per generation batch: a signal after step 3 lets step 4 (same
    # batch, no new rollout) finish, so the checkpoint sits on a generation boundary.
    kw = dict(steps_per_generation=2, per_device_train_batch_size=4)
    err, first, resumed = _interrupt_then_resume(
        tiny_model_dir, tmp_path, callbacks=[SignalAtStep(3)], **kw
    )
    assert err.step == 4 and err.checkpoint == tmp_path / "checkpoint-4"
    params, opt, _ = straight(**kw)
    _assert_same(flat_numpy(resumed.state.params), params)
    _assert_same(flat_numpy(resumed.state.opt_state), opt)


def test_guard_second_signal_raises_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with InterruptGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested and guard.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this returns
    assert signal.getsignal(signal.SIGINT) is before
    with InterruptGuard(enabled=False) as guard:
        assert signal.getsignal(signal.SIGINT) is before
        assert not guard.requested


def test_guard_abandonable_block_raises_on_the_first_signal():
    with InterruptGuard() as guard:
        with pytest.raises(KeyboardInterrupt):
            with guard.abandonable():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):  # already requested: refuse new work
            with guard.abandonable():
                pass


# -- the real `grpo train` subprocess --------------------------------------------------------


def _cli(*args):
    return [sys.executable, "-m", "grpo", "train", *args]


FAST = [
    "--warm_start_steps", "0",
    "--max_steps", "16",
    "--save_steps", "4",
    "--per_device_train_batch_size", "16",
    "--num_generations", "4",
    "--max_completion_length", "4",
    "--logging_steps", "1",
    "--disable_tqdm",
]  # fmt: skip


def _run(out, env, *extra, signals: str = ""):
    """``grpo train`` to completion; ``signals`` makes it signal itself at given steps
    (``GRPO_TEST_SIGNAL_AT_STEP``, see grpo.io.faults), so where it stops never depends on
    how fast this machine is."""
    env = dict(env, **({ENV: signals} if signals else {}))
    return subprocess.run(
        _cli(*FAST, "--output_dir", str(out), *extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # a hang guard only; no assertion depends on it
    )


def _adapters(out):
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def _assert_checkpoints_complete(out):
    named = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert named and named == sorted(list_checkpoints(out))  # no partial checkpoint-N
    for path in named:
        for name in REQUIRED:
            assert (path / name).stat().st_size > 0, path / name
        mx.load(str(path / "adapters.safetensors"))
        mx.load(str(path / "optimizer.safetensors"))
        json.loads((path / "trainer_state.json").read_text())


def _steps(out):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(out)]


# Wall-clock metrics differ between any two runs; every other value must match exactly.
TIMING = ("step_time", "tokens_per_second")


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_grpo_train_killed_then_interrupted_then_resumed_equals_uninterrupted(tmp_path, cli_env):
    # logging_steps=3 with save_steps=4: checkpoints 4 and 10 fall inside logging windows
    # (4-6 and 10-12), so the resumed run must complete those records from the checkpoint.
    log3 = ("--logging_steps", "3")
    straight = tmp_path / "straight"
    done = _run(straight, cli_env, *log3)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "run"
    # 1. SIGKILL when step 7 ends (checkpoint-4 saved, record 6 written): no cleanup runs.
    killed = _run(out, cli_env, *log3, signals="7:KILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _assert_checkpoints_complete(out)
    assert _steps(out) == [4]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3, 6]

    # 2. Resume; SIGINT when step 10 ends: it stops at the generation boundary (one
    # optimizer step per generation batch here), saves checkpoint-10 and exits 130.
    stopped = _run(out, cli_env, *log3, "--resume_from_checkpoint", signals="10:INT")
    assert stopped.returncode == 130, stopped.stderr
    _assert_checkpoints_complete(out)
    assert _steps(out) == [8, 10]  # the default job keeps the newest two
    assert f"saved {out / 'checkpoint-10'}" in stopped.stderr
    assert stopped.stderr.strip().count("\n") == 0, stopped.stderr  # one line
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3, 6, 9]

    # 3. Resume to the end: the same weights, bit for bit, and the same records.
    finished = _run(out, cli_env, *log3, "--resume_from_checkpoint")
    assert finished.returncode == 0, finished.stderr
    _assert_same(_adapters(out), _adapters(straight))
    want = read_metrics(straight / "metrics.jsonl")
    got = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [3, 6, 9, 12, 15, 16]
    assert _without_timing(got) == _without_timing(want)


def test_grpo_train_second_sigterm_stops_at_once_with_143(tmp_path, cli_env):
    out = tmp_path / "run"
    done = _run(out, cli_env, "--save_steps", "2", signals="3:TERM,3:TERM")
    assert done.returncode == 143, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM received a second time" in lines[0], done.stderr
    assert _steps(out) == [2]  # the second signal skipped the save at the boundary
    _assert_checkpoints_complete(out)


def test_grpo_train_resume_from_a_missing_checkpoint_is_a_one_line_error(tmp_path, cli_env):
    missing = tmp_path / "run" / "checkpoint-8"
    done = subprocess.run(
        _cli(
            *FAST, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(missing)
        ),
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip() == f"error: --resume_from_checkpoint: checkpoint not found: {missing}"
    )
    assert not list_checkpoints(tmp_path / "run")  # never a silent fresh start


def test_a_killed_runs_half_written_saves_are_cleaned_or_restored(tiny_model_dir, tmp_path):
    first = _trainer(tiny_model_dir, tmp_path, max_steps=2, save_steps=2)
    first.train()
    # What SIGKILL can leave behind: checkpoint-2 mid-replacement (only the .old copy
    # exists), an unfinished save, an unfinished rotation, a half-saved adapters file.
    os.replace(tmp_path / "checkpoint-2", tmp_path / ".old-checkpoint-2-77")
    (tmp_path / ".tmp-checkpoint-3-abc").mkdir()
    (tmp_path / ".tmp-checkpoint-3-abc" / "adapters.safetensors").write_bytes(b"half")
    (tmp_path / ".del-checkpoint-1-99").mkdir()
    (tmp_path / ".tmp-123-adapters.safetensors").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("the user's own file stays")
    resumed = _trainer(tiny_model_dir, tmp_path, max_steps=3, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.startswith(".") and n != LOCK_NAME], names
    assert {"checkpoint-2", "checkpoint-3", "notes.txt"} <= set(names)
    _assert_same(
        flat_numpy(load_checkpoint(tmp_path / "checkpoint-2", first.state)[0].params),
        flat_numpy(first.state.params),
    )
