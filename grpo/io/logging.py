"""Metrics sinks: ``metrics.jsonl``, a rich progress bar, and a completions table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; TRL logs None for "no valid value" too
    return value


def average_metrics(history: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Mean of each metric over ``history``, skipping NaN; ``None`` when none is valid."""
    names: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            names.setdefault(k, []).append(float(v))
    out = {}
    for k, vals in names.items():
        valid = [v for v in vals if math.isfinite(v)]
        out[k] = sum(valid) / len(valid) if valid else None
    return out


class MetricsWriter:
    """Appends one JSON object per log event to ``output_dir/metrics.jsonl``."""

    def __init__(self, output_dir: str | Path, *, filename: str = "metrics.jsonl"):
        self.path = Path(output_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in record.items()})
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
        except OSError as e:
            from grpo.io.checkpoint import write_error

            raise write_error("metrics to", self.path, e) from e

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (used when resuming from an earlier checkpoint)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line from a killed run
            if rec.get("step", 0) <= step:
                keep.append(line)
        # Temp file + rename: a kill here must not lose the records being kept.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A rich progress bar showing reward, kl and tokens/s; silent when disabled."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self._progress = RichProgress(
            TextColumn("[bold]GRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=initial, info="")
        self._progress.start()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        info = ""
        if metrics:
            parts = []
            for name, label in (("reward", "reward"), ("kl", "kl"), ("tokens_per_second", "tok/s")):
                v = metrics.get(name)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    parts.append(f"{label}={v:.4g}")
            info = " ".join(parts)
        self._progress.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def completions_table(
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Mapping[str, Sequence[float]],
    advantages: Sequence[float],
    extra: Mapping[str, Sequence] | None = None,
    *,
    step: int,
    limit: int | None = None,
):
    """A ``rich.table.Table`` of prompt / completion / each reward / advantage (TRL's layout),
    then the columns reward functions added with ``log_extra``."""
    from rich.table import Table

    table = Table(title=f"Step {step}", show_lines=True)
    table.add_column("Prompt", overflow="fold")
    table.add_column("Completion", overflow="fold")
    for name in rewards:
        table.add_column(name, justify="right")
    table.add_column("Advantage", justify="right")
    extra = extra or {}
    for name in extra:
        table.add_column(name, overflow="fold")
    n = len(completions) if limit is None else min(limit, len(completions))
    for i in range(n):
        cells = [f"{rewards[name][i]:.2f}" for name in rewards]
        more = [str(v[i]) if i < len(v) else "" for v in extra.values()]
        table.add_row(str(prompts[i]), str(completions[i]), *cells, f"{advantages[i]:.2f}", *more)
    return table


def print_completions(*args, console=None, **kwargs) -> None:
    """Print :func:`completions_table` to ``console`` (a new rich console by default)."""
    from rich.console import Console

    (console or Console()).print(completions_table(*args, **kwargs))
