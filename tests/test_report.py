"""report_to: TensorBoard, W&B (offline) and Trackio, read back from what each wrote.

The training run happens in a subprocess with every tracker's directory and mode set in its
environment (Trackio fixes its store directory when first imported, W&B must be offline), so
nothing reaches the network or the user's home directory. The test then reads the event
files (tensorboard's EventAccumulator), the offline W&B run file (its records decoded with
wandb's own protobuf) and Trackio's SQLite store, and compares them with the run's
``log_history``.
"""

import glob
import importlib.util
import json
import math
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
import warnings

import pytest

from grpo.io import report
from grpo.io.report import Reporters, resolve_report_to, rewrite_logs

HAVE = {name: importlib.util.find_spec(mod) is not None for name, mod in report.PACKAGES.items()}
needs_all = pytest.mark.skipif(
    not all(HAVE.values()), reason=f"pip install mlx-grpo[report] (have {HAVE})"
)

WORKER = textwrap.dedent(
    """
    import json, sys
    import grpo
    from grpo.trainer import GRPOTrainer
    sys.path.insert(0, {tests!r})
    from helpers import tiny_args

    def reward_len(completions, **kw):
        return [float(len(c)) for c in completions]

    args = tiny_args(
        {out!r}, max_steps=2, report_to={report_to!r}, run_name="rt-run", project="rt-proj",
        logging_dir={logdir!r}, eval_strategy="steps", eval_steps=2,
        per_device_eval_batch_size=4,
    )
    data = [{{"prompt": p}} for p in ["ab", "cd", "ef", "gh"]]
    trainer = GRPOTrainer({model!r}, reward_funcs=reward_len, args=args, train_dataset=data,
                          eval_dataset=data[:1])
    trainer.train()
    json.dump(trainer.log_history, open({history!r}, "w"))
    """
)


def _run_worker(tmp_path, model_dir, report_to):
    tests = os.path.dirname(__file__)
    out, logdir = tmp_path / "out", tmp_path / "tb"
    history = tmp_path / "history.json"
    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(
            tests=tests,
            out=str(out),
            report_to=report_to,
            logdir=str(logdir),
            model=str(model_dir),
            history=str(history),
        )  # fmt: skip
    )
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "HF_HUB_OFFLINE": "1",
    }
    (tmp_path / "wandb").mkdir()
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(history.read_text()), logdir


def _expected(history):
    """{(step, tracker key): value} as transformers' callbacks would log them."""
    out = {}
    for record in history:
        for k, v in rewrite_logs({k: v for k, v in record.items() if k != "step"}).items():
            out[(record["step"], k)] = v
    return out


def _wandb_records(path):
    """Records of a W&B ``.wandb`` transaction log (LevelDB log framing, 32 KiB blocks,
    a 7-byte file header), decoded with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        chunk, pos = data[pos : pos + n], pos + n
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            record = pb2.Record()
            record.ParseFromString(buf)
            yield record


def _close(got, want, what):
    assert want, f"{what}: nothing expected"
    for key, v in want.items():
        assert key in got, f"{what}: {key} not written; wrote {sorted(got)[:20]}"
        if isinstance(v, float) and math.isnan(v):
            assert got[key] is None or math.isnan(got[key]), (what, key)
        else:
            assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-6), (what, key)


@needs_all
def test_trackers_write_what_the_trainer_logged(tmp_path, tiny_model_dir):
    history, logdir = _run_worker(tmp_path, tiny_model_dir, ["tensorboard", "wandb", "trackio"])
    assert [r["step"] for r in history] == [1, 2, 2]  # two train records and one eval record
    assert any(k.startswith("eval_") for k in history[-1])
    want = _expected(history)

    # TensorBoard: float32 scalars at the global step, the config as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = {os.path.dirname(p) for p in glob.glob(str(logdir / "**/events.out.tfevents.*"), recursive=True)}  # fmt: skip
    acc = EventAccumulator(run_dir)
    acc.Reload()
    tb = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    want32 = {k: v for k, v in want.items() if abs(v) < 1e30}
    for key, v in want32.items():
        assert tb[key] == pytest.approx(v, rel=1e-6, abs=1e-6, nan_ok=True), key
    assert "train/loss" in {t for _, t in tb} and "eval/reward" in {t for _, t in tb}

    # W&B offline run: name, project, config, and history rows keyed by train/global_step.
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows, run = [], None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})  # fmt: skip
    assert run.display_name == "rt-run" and run.project == "rt-proj"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["max_steps"] == 2 and config["run_name"] == "rt-run"
    wb = {(r["train/global_step"], k): v for r in rows for k, v in r.items()}
    _close(wb, want, "wandb")

    # Trackio's local store (SQLite): one row per log call, at the global step.
    db = sqlite3.connect(tmp_path / "trackio" / "rt-proj.db")
    runs = {name for (name,) in db.execute("select run_name from metrics")}
    assert runs == {"rt-run"}
    tr = {
        (step, k): v
        for step, text in db.execute("select step, metrics from metrics")
        for k, v in json.loads(text).items()
    }
    _close(tr, want, "trackio")


def test_resolve_report_to():
    assert resolve_report_to("none") == () and resolve_report_to(None) == ()
    assert resolve_report_to(["wandb", "tensorboard", "wandb"]) == ("wandb", "tensorboard")
    installed = tuple(r for r in report.REPORTERS if report._installed(r))
    assert resolve_report_to("all") == installed
    with pytest.warns(UserWarning, match="'mlflow' is a transformers integration"):
        assert resolve_report_to(["mlflow", "tensorboard"]) == ("tensorboard",)
    with pytest.raises(ValueError, match="report_to: 'tensorbored' is not supported"):
        resolve_report_to(["tensorbored"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_report_to(["tensorboard", "none"])


def test_trainer_rejects_an_unknown_tracker_before_loading(tmp_path):
    from helpers import tiny_args

    from grpo.trainer import GRPOTrainer

    with pytest.raises(ValueError, match="'tensorbored' is not supported"):
        GRPOTrainer(
            "/nonexistent/model",  # never loaded: the check comes first
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=tiny_args(tmp_path, report_to="tensorbored"),
            train_dataset=[{"prompt": "a"}],
        )


@pytest.mark.parametrize(
    "name, modules, package",
    [
        ("wandb", ["wandb"], "wandb"),
        ("trackio", ["trackio"], "trackio"),
        ("tensorboard", ["tensorboardX", "torch", "torch.utils.tensorboard"], "tensorboardX"),
    ],
)
def test_missing_package_names_the_pip_package(tmp_path, monkeypatch, name, modules, package):
    from helpers import tiny_args

    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # import of m raises ImportError
    with pytest.raises(ImportError, match=f"needs the '{package}' package: pip install {package}"):
        Reporters([name], tiny_args(tmp_path))


class _Fake:
    def __init__(self, args, config):
        self.logged, self.closed, self.config = [], 0, config

    def log(self, step, logs):
        self.logged.append((step, logs))

    def close(self):
        self.closed += 1


def test_reporters_rewrite_keys_and_close_once(tmp_path, monkeypatch):
    from helpers import tiny_args

    monkeypatch.setitem(report._CLASSES, "wandb", _Fake)
    reporters = Reporters("wandb", tiny_args(tmp_path, hub_token="secret"))
    (fake,) = reporters.reporters
    assert fake.config["hub_token"] == "<HUB_TOKEN>"  # tokens never reach a tracker
    reporters.log(3, {"step": 3, "loss": 0.5, "eval_reward": 1.0})
    assert fake.logged == [(3, {"train/loss": 0.5, "eval/reward": 1.0})]
    reporters.close()
    reporters.close()
    assert fake.closed == 1
