"""Which run owns what in an output directory, and whether a checkpoint fits this run.

Every training run has a ``run_id``, recorded in each of its checkpoints
(``trainer_state.json``) and in ``output_dir/run.json``, which says whose ``metrics.jsonl``
and final weights sit in the directory. A resumed run keeps the id of the checkpoint it
resumes. Files of *another* run are never mixed with the current one's: the trainer refuses
to start over them unless ``overwrite_output_dir`` is set, and then deletes them before its
first save. Checkpoints written before run ids existed have none; they count as another
run's when starting afresh and are left alone (never rotated) when resuming.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from grpo.errors import CheckpointError, ConfigError
from grpo.io import checkpoint as ckpt
from grpo.io.checkpoint import (
    _NAME,
    ADAPTER_CONFIG,
    ADAPTERS,
    remove_checkpoint,
    run_id_of,
)

RUN_FILE = "run.json"
# What a run writes into output_dir itself (besides checkpoints, run.json and the lock).
RUN_OUTPUTS = ("metrics.jsonl", ADAPTERS, ADAPTER_CONFIG, "reward_curve.png")
# Settings a resumed run must share with its checkpoint: they fix the prompt order, the
# batch geometry and the shape and meaning of the trained weights.
RESUME_FIELDS = (
    "seed",
    "shuffle_dataset",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "generation_batch_size",
    "steps_per_generation",
    "num_iterations",
    "max_prompt_length",
    "max_completion_length",
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "lora_num_layers",
    "lora_target_modules",
    "quantize_bits",
    "quantize_group_size",
    "rollout_quantization",
    "rollout_quantization_group_size",
)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def recorded_run(output_dir: str | Path) -> str | None:
    """The ``run_id`` in ``output_dir/run.json`` (``None`` if there is none)."""
    try:
        data = json.loads((Path(output_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("run_id") if isinstance(data, dict) else None


def write_run_file(output_dir: str | Path, run_id: str) -> None:
    path = Path(output_dir) / RUN_FILE
    tmp = path.with_name(f".{RUN_FILE}.tmp")
    tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
    os.replace(tmp, path)


def latest_checkpoint(output_dir: str | Path) -> Path:
    """The newest complete checkpoint not recorded as another run's than ``run.json``
    names (one whose ``trainer_state.json`` is unreadable counts, so loading it fails
    loudly instead of an older one being resumed silently)."""
    owner = recorded_run(output_dir)
    found = ckpt.list_checkpoints(output_dir)
    mine = [p for p in found if owner is None or run_id_of(p) in (None, owner)]
    return mine[-1] if mine else ckpt.latest_checkpoint(output_dir)


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.iterdir() if _NAME.match(p.name) and p.is_dir())


def other_runs_files(output_dir: str | Path, *, run_id: str | None) -> list[Path]:
    """What runs other than ``run_id`` left in ``output_dir``.

    Args:
        run_id: the current run's id when resuming; ``None`` for a fresh start, for which
            every checkpoint and run output already there belongs to another run.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    if run_id is None:
        found = _checkpoint_dirs(output_dir)
        return found + [output_dir / n for n in RUN_OUTPUTS if (output_dir / n).exists()]
    found = [p for p in _checkpoint_dirs(output_dir) if run_id_of(p) not in (None, run_id)]
    owner = recorded_run(output_dir)
    if owner is not None and owner != run_id:
        found += [output_dir / n for n in RUN_OUTPUTS if (output_dir / n).exists()]
    return found


def claim(output_dir: str | Path, *, run_id: str, resuming: bool, overwrite: bool) -> None:
    """Make ``output_dir`` this run's: refuse, or (``overwrite``) delete, another run's files,
    then record ``run_id`` in ``run.json``. Call it holding the directory's lock."""
    output_dir = Path(output_dir)
    others = other_runs_files(output_dir, run_id=run_id if resuming else None)
    if others and not overwrite:
        names = ", ".join(p.name for p in others[:4]) + (", ..." if len(others) > 4 else "")
        raise ConfigError(
            f"output_dir {output_dir} already holds another run's files ({names}); set "
            "overwrite_output_dir (--overwrite_output_dir) to delete them, resume that run "
            "with resume_from_checkpoint, or use another output_dir"
        )
    for path in others:
        if path.is_dir():
            remove_checkpoint(path)
        else:
            path.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_run_file(output_dir, run_id)


def check_resume_settings(saved: Mapping | None, current: Mapping, *, path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first :data:`RESUME_FIELDS` setting whose
    value differs between the checkpoint's config (``saved``) and this run's."""
    if not isinstance(saved, Mapping):
        return  # a checkpoint without its config: the loaders' own checks still apply
    for name in RESUME_FIELDS:
        if name in saved and name in current and saved[name] != current[name]:
            raise CheckpointError(
                f"{path} was saved with {name}={saved[name]!r}, this run has "
                f"{name}={current[name]!r}; resuming would not continue that run (set "
                f"{name}={saved[name]!r}, or start afresh in another output_dir)"
            )
