"""Data-parallel GRPO over mx.distributed: pure helpers, and real two-process runs on loopback.

The two-process tests start ``mlx.launch -n 2 --backend ring --hosts 127.0.0.1`` on a free
port pair, in their own process group, with a timeout: a hung collective fails the test and
the whole group is killed. ``mlx.launch`` exits 0 even when a rank fails (mlx 0.32), so
success is judged by each rank's result file (written last) and the launcher's warnings.
"""

from __future__ import annotations  # noqa: I001  (grpo must be imported before mlx)

import importlib.util
import inspect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import grpo  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dist_worker
from grpo.core import distributed as D
from grpo.io import dist

TESTS_DIR = Path(__file__).resolve().parent
WORKER = TESTS_DIR / "dist_worker.py"
# Generous: each launch takes ~2-20 s; only a hung collective should ever reach this.
LAUNCH_TIMEOUT_S = 150


# --------------------------------------------------------------------- harness


class Launch(NamedTuple):
    stdout: str
    stderr: str
    results: dict[int, dict]  # rank -> that rank's result file (missing = did not finish)


def _mlx_launch() -> list[str]:
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def _free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free on 127.0.0.1 (ring uses one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of consecutive loopback ports")


def launch(scenario: str, out_dir: Path, *args: str, n: int = 2) -> Launch:
    """Run ``n`` ranks of ``dist_worker.py scenario`` on loopback; fail the test on a hang."""
    cmd = [
        *_mlx_launch(), "--hosts", "127.0.0.1", "-n", str(n), "--backend", "ring",
        "--starting-port", str(_free_port_pair()), "--python", sys.executable,
        "--", str(WORKER), scenario, str(out_dir), *args,
    ]  # fmt: skip
    return _run(cmd, scenario, out_dir, n)


def run_alone(scenario: str, out_dir: Path, *args: str) -> Launch:
    """The same worker as one plain process (no launcher, no group)."""
    cmd = [sys.executable, str(WORKER), scenario, str(out_dir), *args]
    return _run(cmd, scenario, out_dir, 1)


def _run(cmd: list[str], scenario: str, out_dir: Path, n: int) -> Launch:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in dist._LAUNCHER_ENV}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, cwd=TESTS_DIR, env=env,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{scenario}: {n}-rank job still running after {LAUNCH_TIMEOUT_S}s (hung collective?)"
            f"\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        )
    files = {r: out_dir / f"rank{r}.json" for r in range(n)}
    results = {r: json.loads(p.read_text()) for r, p in files.items() if p.exists()}
    return Launch(out, err, results)


def assert_all_ranks_finished(run: Launch, n: int = 2) -> None:
    assert sorted(run.results) == list(range(n)) and "[WARN] Node with rank" not in run.stderr, (
        f"not every rank finished\n--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}"
    )


# ----------------------------------------------------------- single process


def test_no_group_means_one_process():
    x = mx.array([1.0, 2.0])
    tree = {"w": x, "b": [x * 2]}
    assert (D.rank(None), D.world_size(None), D.is_distributed(None)) == (0, 1, False)
    for op in (D.all_sum, D.all_mean, D.all_max, D.all_min):
        assert op(x, group=None) is x
    assert D.average_gradients(tree, group=None) is tree
    assert D.max_divergence(tree, group=None).item() == 0.0
    assert D.reduce_metrics({"a": x[0]}, group=None) == {"a": x[0]}


def test_singleton_group_launches_no_collective():
    group = mx.distributed.init()  # not launched: the singleton group
    assert group.size() == 1 and not D.is_distributed(group)
    x = mx.array([3.0])
    assert D.all_sum(x, group=group) is x
    assert dist.init_distributed() is None


def test_init_distributed_alone_does_not_touch_mx_distributed(monkeypatch):
    for name in dist._LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mx.distributed, "init", None)  # would raise TypeError if called
    assert not dist.launched() and dist.init_distributed() is None


@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 40),
        elements=st.one_of(st.floats(-5, 5, width=32), st.just(np.float32("nan"))),
    )
)
def test_nan_mean_std_matches_numpy_locally(x):
    mean, std = D.nan_mean_std(mx.array(x), group=None)
    valid = x[~np.isnan(x)].astype(np.float64)
    if valid.size == 0:
        assert np.isnan(mean.item()) and np.isnan(std.item())
        return
    np.testing.assert_allclose(mean.item(), valid.mean(), rtol=1e-5, atol=1e-5)
    if valid.size == 1:
        assert np.isnan(std.item())
    else:
        np.testing.assert_allclose(std.item(), valid.std(ddof=1), rtol=1e-4, atol=1e-5)


@given(st.floats(-100, 100, width=32), st.integers(2, 50))
def test_equal_values_have_exactly_zero_std(value, n):
    # A batch of equal rewards must give advantage 0 (TRL's zero-std case), not noise / eps.
    mean, std = D.nan_mean_std(mx.full((n,), value), group=None)
    assert mean.item() == np.float32(value) and std.item() == 0.0


def test_num_items_in_batch_single_process():
    mask = mx.array([[1, 1, 0], [1, 0, 0]])
    assert D.num_items_in_batch(mask, group=None).item() == 3.0
    assert D.num_items_in_batch(mx.zeros((2, 3)), group=None).item() == 1.0


def test_rank_key_rank0_is_the_seed_key_and_ranks_differ():
    key = mx.random.key(7)
    assert D.rank_key(key, rank=0).tolist() == key.tolist()
    keys = [tuple(D.rank_key(key, rank=r).tolist()) for r in range(16)]
    assert len(set(keys)) == 16
    assert keys[3] == tuple(D.rank_key(mx.random.key(7), rank=3).tolist())
    assert keys[3] != tuple(D.rank_key(mx.random.key(8), rank=3).tolist())
    draws = [mx.random.uniform(shape=(4,), key=D.rank_key(key, rank=r)).tolist() for r in (0, 1)]
    assert draws[0] != draws[1]
    with pytest.raises(ValueError, match="rank=-1"):
        D.rank_key(key, rank=-1)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("completions/max_length", "max"),
        ("completions/min_terminated_length", "min"),
        ("clip_ratio/high_max", "max"),
        ("clip_ratio/low_min", "min"),
        ("sampling/ratio/min", "min"),
        ("clip_ratio/low_mean", "mean"),
        ("reward_std", "mean"),
        ("maximum_effort", "mean"),
    ],
)
def test_metric_reducer_from_name(name, kind):
    assert D.metric_reducer(name) == kind


def test_reduce_metrics_rejects_unknown_reducer():
    with pytest.raises(ValueError, match="median"):
        D.reduce_metrics({"a": mx.array(1.0)}, group=None, reducers={"a": "median"})


def test_io_helpers_single_process():
    calls = []
    assert dist.on_main(None, calls.append, 1) is None and calls == [1]
    assert dist.is_main_process(None) and dist.rank_prefix(None) == ""
    dist.barrier(None)
    with pytest.raises(ValueError, match="bad reward"):
        with dist.fail_fast(None):
            raise ValueError("bad reward")
    with pytest.raises(ValueError, match="backend"):
        dist.init_distributed(backend="tcp")
    assert dist.gather_json({"a": [1]}, group=None) == [{"a": [1]}]
    made = dist.main_only(None, dict, a=1)
    assert made == {"a": 1}
    assert dist.Discard().write({"x": 1}) is None and dist.Discard().anything() is None


# ------------------------------------------------------------- two processes


def _np_reference(seed: int, world: int) -> dict:
    case = dist_worker.full_case(seed, world)
    r, mask, feats = case["rewards"].astype(np.float64), case["mask"], case["feats"]
    valid = r[~np.isnan(r)]
    std = valid.std(ddof=1)
    grouped = r.reshape(-1, dist_worker.G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN group
        adv = (grouped - np.nanmean(grouped, axis=1, keepdims=True)) / (std + 1e-4)
    lengths = mask.sum(axis=1)
    n = dist_worker.B * dist_worker.G
    tokens = [mask[i * n : (i + 1) * n].sum() for i in range(world)]
    return {
        "mean": valid.mean(),
        "std": std,
        "num_items": mask.sum() / world,
        # Gradient of the one-process dapo loss sum(feats @ w * m) / sum(m) w.r.t. w.
        "grad": (feats * mask[..., None]).sum(axis=(0, 1)) / mask.sum(),
        "adv": np.nan_to_num(adv, nan=0.0).reshape(-1),
        "metrics": {
            "tokens_mean": np.mean(tokens),
            "tokens_sum": mask.sum(),
            "len_max": lengths.max(),
            "len_min": lengths.min(),
        },
    }


def test_two_ranks_collectives_match_one_process_reference(tmp_path):
    run = launch("collectives", tmp_path)
    assert_all_ranks_finished(run)
    r0, r1 = run.results[0], run.results[1]
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    for res in (r0, r1):
        assert res["all_sum"] == [3.0, 20.0]
        assert res["all_mean"] == [2.0]
        assert res["all_max"] == [1.0, 0.0] and res["all_min"] == [0.0, -1.0]
        assert res["avg_a"] == [0.5] * 3 and res["avg_b"] == [[2.0, 2.0], [2.0, 2.0]]
        assert res["div_same"] == 0.0 and res["div_rank"] == 3.0
    for res in (r0, r1):
        m = res["nan_metrics"]
        assert m["only_rank1"] == 4.0 and math.isnan(m["nowhere"]) and m["s"] == 2.0
        assert m["x/max_len"] == 2.0 and m["clip/low_min"] == -1.0
        assert (
            res["mismatch"].startswith("ValueError") and "different metric names" in res["mismatch"]
        )
        assert res["in_sync"] is None
        assert res["gathered"] == [{"rank": 0, "pad": ""}, {"rank": 1, "pad": "é" * 5}]
        assert res["out_of_sync"].startswith("RuntimeError") and "'w'" in res["out_of_sync"]
    # Per-rank keys: rank 0 keeps the seed key, rank 1 gets the key its rank alone implies.
    assert r0["key"] == mx.random.key(7).tolist()
    assert r1["key"] == D.rank_key(mx.random.key(7), rank=1).tolist() != r0["key"]

    # Sharded statistics equal one process holding the whole batch (NumPy, float64).
    for seed in range(dist_worker.STAT_CASES):
        ref = _np_reference(seed, world=2)
        for r, res in run.results.items():
            got = res["stats"][seed]
            for name in ("mean", "std", "num_items"):
                np.testing.assert_allclose(
                    got[name], ref[name], rtol=2e-5, err_msg=f"{name} seed={seed}"
                )
            np.testing.assert_allclose(got["grad"], ref["grad"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["grad_compiled"], ref["grad"], rtol=1e-5, atol=1e-6)
            lo, hi = r * dist_worker.B * dist_worker.G, (r + 1) * dist_worker.B * dist_worker.G
            np.testing.assert_allclose(got["adv"], ref["adv"][lo:hi], rtol=1e-4, atol=1e-5)
            for name, value in ref["metrics"].items():
                np.testing.assert_allclose(got["metrics"][name], value, rtol=1e-6, err_msg=name)


def _advantages_hook_present() -> bool:
    from grpo.core.advantages import make_advantages

    return "group" in inspect.signature(make_advantages).parameters


@pytest.mark.skipif(
    not _advantages_hook_present(),
    reason="grpo.core.advantages.make_advantages has no group= hook yet "
    "(apply /work/ref/dist_trainer.patch)",
)
def test_two_ranks_advantages_equal_one_process_on_the_full_batch(tmp_path):
    from grpo.core.advantages import make_advantages

    run = launch("advantages", tmp_path)
    assert_all_ranks_finished(run)
    rows, weights = dist_worker.B * dist_worker.G, mx.array([1.0, 0.5])
    i = 0
    for seed in range(3):
        full = mx.array(dist_worker.advantages_case(seed, world=2))
        for variant in dist_worker.ADV_VARIANTS:
            ref = make_advantages(group_size=dist_worker.G, **variant)(full, weights)
            for r, res in run.results.items():
                got = res["cases"][i]
                sl = slice(r * rows, (r + 1) * rows)
                np.testing.assert_allclose(
                    got["adv"], np.array(ref.advantages)[sl], rtol=1e-5, atol=1e-5,
                    err_msg=f"seed={seed} {variant} rank={r}",
                )  # fmt: skip
                assert got["zero"] == np.array(ref.is_std_zero)[sl].tolist()
            i += 1


def test_a_failing_rank_takes_the_job_down_instead_of_hanging(tmp_path):
    run = launch("raise", tmp_path)
    assert run.results == {}, f"a rank finished despite rank 1 failing: {run.results}"
    assert "reward function 'boom' failed on rank 1" in run.stderr, run.stderr[-4000:]
    assert "[rank 1/2]" in run.stderr and "Node with rank 1 exited with code 1" in run.stderr


# ------------------------------------------------------- end-to-end training


def _trainer_is_data_parallel() -> bool:
    if importlib.util.find_spec("grpo.trainer") is None:
        return False  # not written yet; once it exists, an import error fails loudly here
    import grpo.trainer

    return getattr(grpo.trainer, "DATA_PARALLEL", False)


needs_trainer_patch = pytest.mark.skipif(
    not _trainer_is_data_parallel(),
    reason="grpo.trainer has no DATA_PARALLEL flag yet: apply /work/ref/dist_trainer.patch "
    "(group= in make_advantages, mlx.launch-aware GRPOTrainer)",
)

# Metrics whose all-reduced value must equal the one-process value (equal-size rank batches).
SAME_METRICS = ("reward", "loss", "grad_norm", "completions/mean_length", "num_tokens",
                "completions/max_length", "completions/min_length")  # fmt: skip


@needs_trainer_patch
def test_two_ranks_with_batch_B_train_like_one_process_with_batch_2B(tmp_path, tiny_model_dir):
    import dist_train_worker as W

    one = run_alone("train", tmp_path / "one", str(tiny_model_dir), "4")
    two = launch("train", tmp_path / "two", str(tiny_model_dir), "2")
    assert_all_ranks_finished(one, n=1)
    assert_all_ranks_finished(two)
    assert two.results[0]["world"] == 2 and one.results[0]["world"] == 1
    ref = np.load(tmp_path / "one" / "params_rank0.npz")
    ranks = [np.load(tmp_path / "two" / f"params_rank{r}.npz") for r in (0, 1)]
    assert sorted(ranks[0].files) == sorted(ref.files) and ref.files
    for name in ref.files:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        np.testing.assert_allclose(ranks[0][name], ref[name], rtol=0, atol=1e-6, err_msg=name)
    # The parameters really moved, so a wrong scale or a missing all-reduce would show.
    assert one.results[0]["moved"] > 1e-3
    # Resuming at step 2 (every rank from its own saved sampler position) redoes step 3.
    for res in (*one.results.values(), *two.results.values()):
        assert res["resume_diff"] <= 1e-6

    # Rank 0 logged the all-reduced metrics, equal to the one-process ones.
    log_one, log_two = one.results[0]["log"], two.results[0]["log"]
    assert [r["step"] for r in log_one] == [r["step"] for r in log_two] == [1, 2, 3]
    for a, b in zip(log_one, log_two, strict=True):
        for name in SAME_METRICS:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Every rank holds the same reduced logs (wall-clock timings aside).
    timing = ("step_time", "tokens_per_second")
    for r0, r1 in zip(log_two, two.results[1]["log"], strict=True):
        assert {k: v for k, v in r0.items() if k not in timing} == {
            k: v for k, v in r1.items() if k not in timing
        }

    # Only rank 0 wrote: one line per step (the resumed run rewrote step 3), and checkpoints.
    out = tmp_path / "two" / "trainer"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == W.STEPS
    assert (out / "checkpoint-2").is_dir() and (out / f"checkpoint-{W.STEPS}").is_dir()


@needs_trainer_patch
def test_a_rank_whose_reward_function_raises_stops_the_training_job(tmp_path, tiny_model_dir):
    run = launch("train_raise", tmp_path, str(tiny_model_dir), "2")
    assert run.results == {}, f"a rank finished despite rank 1 failing: {run.results}"
    assert "reward function 'reward_that_breaks' failed on rank 1" in run.stderr, run.stderr[-4000:]
    assert "[rank 1/2]" in run.stderr


# ------------------------------------------------- `grpo train` under mlx.launch


def launch_grpo(out_dir: Path, *args: str, n: int = 2) -> Launch:
    """``mlx.launch -n 2 --backend ring -- grpo ARGS`` on loopback (docs/distributed.md).

    ``--verbose`` makes the launcher report ``Node with rank r completed`` for every rank
    that exits 0: the CLI prints on rank 0 only, so that line is rank 1's proof of success.
    """
    script = Path(sys.executable).parent / "grpo"
    grpo_cmd = [str(script)] if script.exists() else [sys.executable, "-m", "grpo"]
    cmd = [
        *_mlx_launch(), "--hosts", "127.0.0.1", "-n", str(n), "--backend", "ring",
        "--starting-port", str(_free_port_pair()), "--verbose", "--", *grpo_cmd, *args,
    ]  # fmt: skip
    return _run(cmd, f"grpo {' '.join(args)}", out_dir, n)


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_grpo_train_cli_under_mlx_launch_writes_once_from_rank_0(tmp_path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    monkeypatch.setenv("MLX_GRPO_CACHE", str(cache))  # _run passes os.environ on
    argv = (
        "train", "--max_steps", "2", "--logging_steps", "1", "--warm_start_steps", "5",
        "--per_device_train_batch_size", "16", "--output_dir", str(out),
    )  # fmt: skip
    run = launch_grpo(tmp_path / "launch", *argv)
    log = f"--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}"
    for r in (0, 1):
        assert f"Node with rank {r} completed" in run.stderr, log
    assert "[WARN]" not in run.stderr and "Traceback" not in run.stderr, log

    # Rank 0 alone built the default model (once, atomically) and printed the summary.
    assert len(_lines(run.stdout, "model: building")) == 1, log
    assert len(_lines(run.stdout, "warm start: done")) == 1, log
    [intro] = _lines(run.stdout, "GRPO: 2 steps")
    assert "on 2 ranks x 16 completions per micro-batch" in intro
    assert len(_lines(run.stdout, "done in ")) == 1 and len(_lines(run.stdout, "wrote ")) == 1
    [model_dir] = list(cache.iterdir())  # no second copy, no leftover temporary build
    assert (model_dir / "model.safetensors").exists()

    # Exactly one metrics file and plot, with one record per step and finite metrics.
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.jsonl")] == [
        Path("out/metrics.jsonl")
    ]
    assert [p.name for p in tmp_path.rglob("*.png")] == ["reward_curve.png"]
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for rec in records:
        for name in ("reward", "loss", "kl", "grad_norm", "num_tokens"):
            assert math.isfinite(rec[name]), (name, rec)
        assert 0.0 <= rec["reward"] <= 1.0

    # Rank 0 saved the trained weights and a checkpoint holding both ranks' sampler state.
    start = mx.load(str(model_dir / "model.safetensors"))
    trained = mx.load(str(out / "adapters.safetensors"))
    assert sorted(trained) == sorted(start)
    assert all(bool(mx.isfinite(v).all()) for v in trained.values())
    assert max(mx.abs(trained[k] - start[k]).max().item() for k in start) > 0  # it trained
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert len(state["sampler_per_rank"]) == 2

    # The same command again: rank 0 refuses to overwrite the run, and no rank exits 0.
    again = launch_grpo(tmp_path / "again", *argv)
    assert "[rank 0/2] error: --output_dir" in again.stderr, again.stderr[-4000:]
    assert "Node with rank 0 exited with code 2" in again.stderr, again.stderr[-4000:]
    assert "completed" not in again.stderr, again.stderr[-4000:]
    assert len(records) == len((out / "metrics.jsonl").read_text().splitlines())
