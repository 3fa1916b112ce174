"""Ctrl-C saves and exits 130; SIGKILL at any moment leaves a loadable checkpoint; resuming
either one ends with exactly the parameters of an uninterrupted run.

In-process tests deliver real signals to this process (``os.kill(os.getpid(), ...)``) from
inside training (a callback between steps, a reward function during generation). The
subprocess tests run the real ``grpo train`` command and kill it.
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


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ, MLX_GRPO_CACHE=str(tmp_path_factory.mktemp("cache")))
    env.pop("MLX_RANK", None)
    return env


def _start(out, env, *extra):
    return subprocess.Popen(
        _cli(*FAST, "--output_dir", str(out), *extra),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(proc, out, *, after: int, timeout: float = 120.0) -> int:
    """Poll until a checkpoint newer than step ``after`` exists; return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
        newer = [s for s in steps if s > after]
        if newer:
            return min(newer)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint after step {after} within {timeout}s")


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


def test_grpo_train_killed_then_interrupted_then_resumed_equals_uninterrupted(tmp_path, cli_env):
    straight = tmp_path / "straight"
    done = subprocess.run(
        _cli(*FAST, "--output_dir", str(straight)), env=cli_env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr

    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    # 1. SIGKILL at a random moment after the first checkpoint: no cleanup code runs at all.
    proc = _start(out, cli_env)
    _wait_for_checkpoint(proc, out, after=0)
    time.sleep(float(rng.uniform(0.0, 0.3)))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    _assert_checkpoints_complete(out)
    killed_at = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert killed_at < 16

    # 2. Resume; Ctrl-C once it has saved again: it stops cleanly, saves and exits 130.
    proc = _start(out, cli_env, "--resume_from_checkpoint")
    _wait_for_checkpoint(proc, out, after=killed_at)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    _assert_checkpoints_complete(out)
    stopped_at = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert killed_at < stopped_at <= 16
    assert f"saved {out / f'checkpoint-{stopped_at}'}" in stderr

    # 3. Resume to the end: the same weights, bit for bit, and each step logged once.
    proc = _start(out, cli_env, "--resume_from_checkpoint")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    want, got = _adapters(straight), _adapters(out)
    _assert_same(got, want)
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 17))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]


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
    assert not [n for n in names if n.startswith(".")], names
    assert {"checkpoint-2", "checkpoint-3", "notes.txt"} <= set(names)
    _assert_same(
        flat_numpy(load_checkpoint(tmp_path / "checkpoint-2", first.state)[0].params),
        flat_numpy(first.state.params),
    )
