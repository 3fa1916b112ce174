"""Experiment trackers named by ``report_to``: TensorBoard, Weights & Biases, Trackio.

Each goes through the library's own writer and is imported only when named, as
transformers' integration callbacks do, with transformers' conventions:

- keys are rewritten ``loss`` -> ``train/loss``, ``eval_reward`` -> ``eval/reward``;
- TensorBoard writes ``add_scalar(key, value, global_step)`` (and the config as the ``args``
  text) under ``$TENSORBOARD_LOGGING_DIR``, else ``logging_dir``, else
  ``output_dir/runs/<time>_<host>``, with ``tensorboardX`` (no PyTorch needed), else
  ``torch.utils.tensorboard``;
- W&B and Trackio start a run named ``run_name`` in ``project`` (W&B: ``$WANDB_PROJECT``
  first) with the config, and log ``{**metrics, "train/global_step": step}``. W&B's offline
  mode (``WANDB_MODE=offline``) needs no network; Trackio stores locally unless a
  ``trackio_space_id`` is set.

``report_to="all"`` means every one of these whose package is installed; ``"none"`` (or an
empty list) none. Names of transformers integrations not wired here warn and are skipped; any
other name is an error.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPORTERS = ("tensorboard", "wandb", "trackio")
# pip package to install for each reporter.
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "trackio": "trackio"}
# transformers' other integrations: accepted with a warning, since a TRL script may name them.
UNWIRED = (
    "azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
    "mlflow", "neptune", "swanlab",
)  # fmt: skip


def _installed(name: str) -> bool:
    if name == "tensorboard":
        return any(importlib.util.find_spec(m) is not None for m in ("tensorboardX", "torch"))
    return importlib.util.find_spec(name) is not None


def resolve_report_to(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """The reporters ``report_to`` names, in order, without duplicates.

    Raises:
        ValueError: a name that is neither a reporter here nor a transformers integration.
    """
    if names is None:
        return ()
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for name in items:
        if name == "none":
            continue
        if name == "all":
            out.extend(r for r in REPORTERS if _installed(r))
        elif name in REPORTERS:
            out.append(name)
        elif name in UNWIRED:
            warnings.warn(
                f"report_to={name!r} is a transformers integration that mlx-grpo does not wire "
                f"(it reports to {', '.join(REPORTERS)}); skipped. metrics.jsonl in output_dir "
                "holds every logged value.",
                UserWarning,
                stacklevel=2,
            )
        else:
            raise ValueError(
                f"report_to: {name!r} is not supported; use any of "
                f"{', '.join(REPORTERS + ('all', 'none'))}"
            )
    return tuple(dict.fromkeys(out))


def _require(module: str, reporter: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"report_to={reporter!r} needs the {PACKAGES[reporter]!r} package: "
            f"pip install {PACKAGES[reporter]} (or pip install 'mlx-grpo[report]')"
        ) from e


def rewrite_logs(logs: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' ``rewrite_logs``: ``eval_x`` -> ``eval/x``, ``test_x`` -> ``test/x``,
    anything else ``x`` -> ``train/x``."""
    out = {}
    for k, v in logs.items():
        if k.startswith("eval_"):
            out["eval/" + k[5:]] = v
        elif k.startswith("test_"):
            out["test/" + k[5:]] = v
        else:
            out["train/" + k] = v
    return out


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with tokens redacted (as transformers' ``to_dict`` does)."""
    return {
        k: ("<" + k.upper() + ">" if k.endswith("_token") and v is not None else v)
        for k, v in config.items()
    }


def default_logdir(output_dir: str) -> str:
    """transformers' TensorBoard default: ``output_dir/runs/<Mon01_12-00-00>_<host>``."""
    import socket
    from datetime import datetime

    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    return os.path.join(output_dir, "runs", f"{stamp}_{socket.gethostname()}")


class TensorBoardReporter:
    name = "tensorboard"

    def __init__(self, args: Any, config: Mapping[str, Any]):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _require("tensorboardX", self.name)
                raise
        logdir = os.getenv("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
        self.logdir = str(Path(logdir).expanduser()) if logdir else default_logdir(args.output_dir)
        self.writer = SummaryWriter(self.logdir)
        self.writer.add_text("args", json.dumps(dict(config), indent=2, default=str))

    def log(self, step: int, logs: Mapping[str, Any]) -> None:
        for k, v in logs.items():
            if isinstance(v, numbers.Real):
                self.writer.add_scalar(k, float(v), step)
            elif isinstance(v, str):
                self.writer.add_text(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    name = "wandb"

    def __init__(self, args: Any, config: Mapping[str, Any]):
        wandb = self.wandb = _require("wandb", self.name)
        self.run = wandb.run
        self.owns_run = self.run is None
        if self.run is None:
            self.run = wandb.init(
                project=os.getenv("WANDB_PROJECT") or getattr(args, "project", None),
                name=getattr(args, "run_name", None),
                config=dict(config),
            )
        else:
            self.run.config.update(dict(config), allow_val_change=True)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, logs: Mapping[str, Any]) -> None:
        self.run.log({**logs, "train/global_step": step})

    def close(self) -> None:
        if self.owns_run:
            self.run.finish()


class TrackioReporter:
    name = "trackio"

    def __init__(self, args: Any, config: Mapping[str, Any]):
        trackio = self.trackio = _require("trackio", self.name)
        trackio.init(
            project=getattr(args, "project", None) or "huggingface",
            name=getattr(args, "run_name", None),
            space_id=getattr(args, "trackio_space_id", None),
            bucket_id=getattr(args, "trackio_bucket_id", None),
            private=getattr(args, "hub_private_repo", None),
            resume="allow",
            config=dict(config),
        )

    def log(self, step: int, logs: Mapping[str, Any]) -> None:
        self.trackio.log({**logs, "train/global_step": step}, step=step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "trackio": TrackioReporter}


class Reporters:
    """The trackers of ``report_to``: ``log(step, metrics)`` to each, ``close()`` at the end.

    Args:
        names: ``report_to`` (resolved by :func:`resolve_report_to`).
        args: the run's :class:`~grpo.config.GRPOConfig` (``output_dir``, ``logging_dir``,
            ``run_name``, ``project``, ``trackio_*``); its ``to_dict()`` is the logged config.
    """

    def __init__(self, names: Iterable[str] | str | None, args: Any):
        self.names = resolve_report_to(names)
        config = public_config(args.to_dict()) if hasattr(args, "to_dict") else {}
        self.reporters: list[Any] = []
        try:
            for name in self.names:
                self.reporters.append(_CLASSES[name](args, config))
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log one record (``step`` and any ``"step"`` key removed) to every tracker."""
        logs = rewrite_logs({k: v for k, v in metrics.items() if k != "step"})
        for reporter in self.reporters:
            reporter.log(int(step), logs)

    def close(self) -> None:
        """Finish every run (each once; later calls do nothing)."""
        reporters, self.reporters = self.reporters, []
        for reporter in reporters:
            reporter.close()
